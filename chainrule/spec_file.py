"""How a YAML or JSON job file becomes a `JobSpec`, and how a bad one is reported.

The file maps onto the message with protobuf's JSON mapping (`json_format.ParseDict`, unknown
fields rejected), so a file, a gRPC request and `dump_job_spec`'s output are the same data.
Before handing the dictionary to protobuf, it is walked against the message descriptor, so that
every mistake is reported as a `SpecError` whose `field_path` names the field the way the user
wrote it (`model.layers[2].linear.out_features`), instead of protobuf's nested "Failed to parse
model field: Failed to parse layers field: ..." chain.

One convenience on top of the JSON mapping: a oneof member given as null (`- relu:` in YAML)
means that member with no settings (`relu: {}`), since that is the only sensible reading.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from chainrule.v1 import job_pb2
from worker.spec_error import SpecError  # lives in worker/, which must not import the client

SPEC_SUFFIXES = (".yaml", ".yml", ".json")

_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
_FLOAT_TYPES = (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT)


def load_job_spec(path_or_text: str | Path) -> job_pb2.JobSpec:
    """Parse a job spec from a .yaml/.yml/.json file, or from YAML/JSON text.

    A `Path`, or a one-line string ending in one of those suffixes, is read as a file; any
    other string is parsed as text (YAML, which includes JSON).
    """
    return job_spec_from_dict(_read_document(path_or_text))


def job_spec_from_dict(data: Any) -> job_pb2.JobSpec:
    """A JobSpec from an already-parsed document (a dict as YAML or JSON gives it), with the
    same checks and errors as `load_job_spec`."""
    if not isinstance(data, Mapping):
        raise SpecError("", f"a job spec must be a mapping of fields, got {_kind(data)}")
    # The stubs type DESCRIPTOR as the pure-Python or the upb class; both have this interface.
    data = _check_message(data, cast(Descriptor, job_pb2.JobSpec.DESCRIPTOR), "")
    spec = job_pb2.JobSpec()
    try:
        json_format.ParseDict(data, spec, ignore_unknown_fields=False)
    except json_format.ParseError as error:  # not expected after the walk; still reported well
        raise _from_parse_error(error) from error
    return spec


def dump_job_spec(spec: job_pb2.JobSpec) -> str:
    """The spec as YAML, in field-number order, with default-valued fields left out, so that
    `load_job_spec(dump_job_spec(spec)) == spec`."""
    data = json_format.MessageToDict(spec, preserving_proto_field_name=True)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


# --- reading the document ------------------------------------------------------------------


def _read_document(path_or_text: str | Path) -> Any:
    source = "spec"
    if isinstance(path_or_text, Path) or _looks_like_path(path_or_text):
        path = Path(path_or_text)
        if path.suffix.lower() not in SPEC_SUFFIXES:
            raise SpecError("", f"{path}: a job spec file must end in {', '.join(SPEC_SUFFIXES)}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise SpecError("", f"cannot read {path}: {error}") from error
        source = str(path)
        if path.suffix.lower() == ".json":
            try:
                return json.loads(text)
            except json.JSONDecodeError as error:
                raise SpecError("", f"{source}: invalid JSON at line {error.lineno}, column "
                                    f"{error.colno}: {error.msg}") from error
    else:
        text = path_or_text
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as error:
        where = ""
        mark = getattr(error, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(error, "problem", None) or str(error)
        raise SpecError("", f"{source}: invalid YAML{where}: {problem}") from error


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping, which plain YAML loading
    resolves silently in favour of the last one (two `optimizer:` entries, one ignored)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        if any(key_node.tag == "tag:yaml.org,2002:merge" for key_node, _ in node.value):
            return super().construct_mapping(node, deep=deep)  # `<<:` merges may override
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _looks_like_path(text: str) -> bool:
    """A one-line string naming a spec file; `name: run.yaml` is YAML text, not a path."""
    if "\n" in text or not text.strip().lower().endswith(SPEC_SUFFIXES):
        return False
    return Path(text).is_file() or not re.search(r":\s|[{}\[\]]", text)


# --- checking the dictionary against the message ---------------------------------------------


def _check_message(data: Mapping, descriptor: Descriptor, path: str) -> dict:
    """A copy of `data` ready for ParseDict, or a SpecError naming the first bad field."""
    fields: dict[str, FieldDescriptor] = {}
    for known in descriptor.fields:
        fields[known.name] = known
        fields[known.json_name] = known
    out: dict[str, Any] = {}
    chosen: dict[str, str] = {}  # oneof name -> the member set
    for key, value in data.items():
        if not isinstance(key, str):
            raise SpecError(path, f"field names must be strings, got {key!r}")
        field = fields.get(key)
        if field is None:
            raise SpecError(path, _unknown_field(key, descriptor))
        oneof = field.containing_oneof
        if oneof is not None and oneof.name not in _synthetic_oneofs(descriptor):
            if oneof.name in chosen:
                members = ", ".join(f.name for f in oneof.fields)
                raise SpecError(path, f"sets both '{chosen[oneof.name]}' and '{field.name}'; "
                                      f"set exactly one of: {members}")
            chosen[oneof.name] = field.name
            if value is None and field.message_type is not None:
                value = {}  # `relu:` in YAML: the member, with no settings
        out[key] = _check_value(value, field, _join(path, field.name))
    return out


def _check_value(value: Any, field: FieldDescriptor, path: str) -> Any:
    if value is None:
        return None  # protobuf's JSON mapping: null means the default
    if _is_repeated(field):
        if not isinstance(value, list):
            raise SpecError(path, f"expected a list, got {_kind(value)}")
        return [_check_single(item, field, f"{path}[{index}]")
                for index, item in enumerate(value)]
    return _check_single(value, field, path)


def _is_repeated(field: FieldDescriptor) -> bool:
    # `is_repeated` is the newer spelling; `label` is deprecated in protobuf 6+.
    repeated = getattr(field, "is_repeated", None)
    if repeated is not None:
        return bool(repeated)
    # protobuf 7's stubs no longer declare `label`; the older runtimes this branch serves have it.
    return field.label == FieldDescriptor.LABEL_REPEATED  # type: ignore[attr-defined]


def _check_single(value: Any, field: FieldDescriptor, path: str) -> Any:
    cpp = field.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_MESSAGE:
        message = field.message_type
        assert message is not None  # a message field always names its message type
        if message.full_name == _SHAPE_VALUE:
            return _check_shape_argument(value, path)
        if not isinstance(value, Mapping):
            hint = ""
            if isinstance(value, str) and value in message.fields_by_name:
                hint = f" (write `{value}: {{}}`)"  # `- relu` for `- relu: {}`
            raise SpecError(path, f"expected a mapping of {message.name} fields, "
                                  f"got {_kind(value)}{hint}")
        return _check_message(value, message, path)
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        if not isinstance(value, bool):
            raise SpecError(path, f"expected true or false, got {_kind(value)}")
        return value
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        if not isinstance(value, str):
            raise SpecError(path, f"expected a string, got {_kind(value)}")
        return value
    if cpp in _INT_RANGES:
        return _check_integer(value, cpp, path)
    if cpp in _FLOAT_TYPES:
        return _check_float(value, path)
    raise SpecError(path, f"fields of type {field.type} are not supported in spec files")


# Shape arguments (kernel_size, stride, padding, ...) take what PyTorch's take: a number, a list
# of numbers, or a word ("same"); protobuf's Value carries any of them. Their ranges are checked
# where the layer is resolved, which knows the layer's dimensionality.
_SHAPE_VALUE = "google.protobuf.Value"


def _check_shape_argument(value: Any, path: str) -> Any:
    if isinstance(value, str) or _is_number(value):
        return value
    if isinstance(value, list) and value and all(_is_number(item) for item in value):
        return value
    raise SpecError(path, f"expected a number, a list of numbers or a word such as 'same', "
                          f"got {_kind(value)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_integer(value: Any, cpp: int, path: str) -> int:
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and re.fullmatch(r"[-+]?\d+", value.strip()):
        number = int(value)  # the JSON mapping accepts integers as strings
    if number is None:
        raise SpecError(path, f"expected an integer, got {_kind(value)}")
    low, high = _INT_RANGES[cpp]
    if not low <= number <= high:
        if low == 0 and number < 0:
            # The field's type says no more: the spec's validation may ask more (out_features
            # >= 1), so this must not suggest that 0 would do.
            raise SpecError(path, f"must not be negative, got {number}")
        raise SpecError(path, f"must lie in [{low}, {high}], got {number}")
    return number


def _check_float(value: Any, path: str) -> float:
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        # YAML 1.1 reads `1e-3` (no dot) as a string; the JSON mapping accepts numeric strings.
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None:
        raise SpecError(path, f"expected a number, got {_kind(value)}")
    if not math.isfinite(number):  # no setting of a job means anything with NaN or infinity
        raise SpecError(path, f"expected a finite number, got {value!r}")
    return number


def _synthetic_oneofs(descriptor: Descriptor) -> set[str]:
    """Oneofs protoc makes for proto3 `optional` fields (`_lr`): not a user-visible choice."""
    return {oneof.name for oneof in descriptor.oneofs
            if len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name}


def _unknown_field(key: str, descriptor: Descriptor) -> str:
    names = [field.name for field in descriptor.fields]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown field '{key}'{hint}; {descriptor.name} fields are: {', '.join(names)}"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{type(value).__name__} {value!r}"


def _from_parse_error(error: json_format.ParseError) -> SpecError:
    """Protobuf's "Failed to parse a field: Failed to parse b field: ..." as path a.b."""
    text = str(error)
    parts = []
    while match := re.match(r"Failed to parse (\w+) field: ", text):
        parts.append(match.group(1))
        text = text[match.end():]
    return SpecError(".".join(parts), text.rstrip("."))
