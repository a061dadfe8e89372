"""The seed's example end to end, on real Ray through the service: pretrain a small causal
transformer on an uploaded text, download it, upload the download as weights, fine-tune it
(`model.init_from`, `init_strict: false`, a new mean_pool + linear head) to tell which of two
source texts a window of bytes comes from, and beat the same model trained from scratch in the
same steps.

The two texts ship with Python (no download): English prose, the docstrings of some standard
library modules, and Python code, the same modules' source with the docstrings taken out
(`ast.unparse`). The language model learns both from a text that interleaves them; the
classifier gets few labelled windows, from parts of the texts the language model never saw.
"""

from __future__ import annotations

import ast
import io
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from chainrule.client import state_name
from chainrule.spec_file import job_spec_from_dict
from tests.services.helpers import wait_until_done

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

MODULES = ("argparse", "dataclasses", "typing", "inspect", "pathlib", "enum", "functools",
           "subprocess", "textwrap", "shutil", "difflib", "threading", "random", "statistics",
           "fractions", "datetime", "configparser", "csv", "optparse", "pprint", "tempfile",
           "traceback", "warnings", "contextlib", "ast")
CONTEXT = 32  # bytes per window
PRETRAINING_BYTES = 48_000  # of each text, interleaved in blocks
BLOCK = 2_000
LABELLED, HELD_OUT = 128, 256  # windows per text: training, validation

BODY = [
    {"embedding": {"num_embeddings": 256, "embedding_dim": 32}},
    {"positional_embedding": {}},
    {"transformer_encoder_layer": {"nhead": 2, "dim_feedforward": 64, "dropout": 0,
                                   "is_causal": True}},
    {"transformer_encoder_layer": {"nhead": 2, "dim_feedforward": 64, "dropout": 0,
                                   "is_causal": True}},
]


def _sources() -> list[ast.Module]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [ast.parse((stdlib / f"{name}.py").read_text(encoding="utf-8")) for name in MODULES]


def _documented(tree: ast.Module) -> list[ast.AST]:
    return [node for node in ast.walk(tree) if isinstance(
        node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]


def prose() -> bytes:
    """The modules' docstrings (those of a few lines at least): English."""
    docstrings = [ast.get_docstring(node) or "" for tree in _sources()
                  for node in _documented(tree)]
    return "\n\n".join(text for text in docstrings if len(text) > 80).encode()


def code() -> bytes:
    """The modules' code without docstrings or comments."""
    trees = _sources()
    for tree in trees:
        for node in _documented(tree):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(
                    getattr(body[0], "value", None), ast.Constant) and isinstance(
                    body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return "\n\n".join(ast.unparse(tree) for tree in trees).encode()


def _interleaved(first: bytes, second: bytes) -> bytes:
    return b"".join(first[i:i + BLOCK] + second[i:i + BLOCK]
                    for i in range(0, PRETRAINING_BYTES, BLOCK))


def _windows(text: bytes, count: int, start: int) -> np.ndarray:
    tokens = np.frombuffer(text[start:start + count * CONTEXT], dtype=np.uint8)
    return tokens.reshape(count, CONTEXT).astype(np.int64)


def _classification_npz() -> bytes:
    """Windows from past the pretraining text: x (n, CONTEXT) byte tokens, y 0 prose, 1 code."""
    start = PRETRAINING_BYTES + 10_000
    prose_windows = _windows(prose(), LABELLED + HELD_OUT, start)
    code_windows = _windows(code(), LABELLED + HELD_OUT, start)
    labels = np.repeat([0, 1], [LABELLED, LABELLED])
    held_out_labels = np.repeat([0, 1], [HELD_OUT, HELD_OUT])
    buffer = io.BytesIO()
    np.savez(buffer, x=np.concatenate([prose_windows[:LABELLED], code_windows[:LABELLED]]),
             y=labels, x_val=np.concatenate([prose_windows[LABELLED:], code_windows[LABELLED:]]),
             y_val=held_out_labels)
    return buffer.getvalue()


def _spec(name: str, layers: list, loss: str, dataset: str, epochs: int, **model) -> dict:
    return {
        "name": name, "model": {"layers": layers, **model}, "loss": loss,
        "optimizer": {"adam": {"lr": 0.003}},
        "data": {"dataset": dataset, "batch_size": 32, "epochs": epochs,
                 **({"context_length": CONTEXT, "validation_fraction": 0.1}
                    if loss == "next_token_cross_entropy" else {})},
        "resources": {"workers": 1, "parameter_servers": 1}, "seed": 3,
    }


def _train(client, spec: dict, timeout: float):
    job = wait_until_done(client, client.submit(job_spec_from_dict(spec)).id, timeout=timeout)
    assert state_name(job.state) == "SUCCEEDED", job.error
    return job


def test_a_pretrained_transformer_fine_tunes_to_beat_the_same_model_from_scratch(
        client, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(_interleaved(prose(), code()))
    assert client.upload(corpus, "corpus").format == "text"
    classes = tmp_path / "prose-or-code.npz"
    classes.write_bytes(_classification_npz())
    assert client.upload(classes, "prose-or-code").num_classes == 2

    # --- pretraining: next-byte prediction on both texts -------------------------------------
    language_model = _train(client, _spec(
        "pretrain", BODY + [{"linear": {"out_features": 256}}], "next_token_cross_entropy",
        "upload:corpus", epochs=4), timeout=900)
    print(f"pretraining: validation loss {language_model.final_validation.loss:.3f} nats per "
          f"byte after {language_model.progress.step} steps")
    # Measured: 2.237 after 340 steps (4 epochs; 1.989 after 7, which fine-tune no better);
    # a uniform guess is log(256) = 5.55.
    assert language_model.final_validation.loss < 2.6
    weights = tmp_path / "language-model.safetensors"
    client.download(language_model.id, weights)
    assert client.upload(weights, "language-model").format == "safetensors"

    # --- fine-tuning against training from scratch, same spec, same steps ---------------------
    head = [{"mean_pool": {}}, {"linear": {"out_features": 2}}]
    fine_tuned = _train(client, _spec(
        "fine-tune", BODY + head, "cross_entropy", "upload:prose-or-code", epochs=4,
        init_from="upload:language-model", init_strict=False), timeout=300)
    scratch = _train(client, _spec(
        "from-scratch", BODY + head, "cross_entropy", "upload:prose-or-code", epochs=4),
        timeout=300)
    assert fine_tuned.progress.step == scratch.progress.step == 32
    fine_tuned_accuracy = fine_tuned.final_validation.accuracy
    scratch_accuracy = scratch.final_validation.accuracy
    print(f"validation accuracy on {2 * HELD_OUT} held-out windows: fine-tuned "
          f"{fine_tuned_accuracy:.3f}, from scratch {scratch_accuracy:.3f}")
    # Measured (seed 3; the runtime gives the same bits on any worker count): fine-tuned 0.898,
    # from scratch 0.738 (0.893 after 7 epochs of pretraining: 4 are as good and 40% cheaper).
    assert fine_tuned_accuracy >= scratch_accuracy + 0.1
