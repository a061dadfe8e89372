"""What "a language model learned something" means in the tests (CLI and service alike): a
validation loss against the unigram baseline, and sampled text that reads as English."""

from __future__ import annotations

import re

import numpy as np

from chainrule.v1 import job_pb2
from scheduler.datasets import builtin_text
from worker.resolved_job import text_windows

COMMON_ENGLISH_WORDS = frozenset(
    "the of and to a in is it that for be as with are this not or by an on if can".split())


def training_part(spec: job_pb2.JobSpec) -> bytes:
    """The bytes of a built-in text a job trains on: all but its validation tail."""
    text = builtin_text(spec.data.dataset)
    return text[:text_windows(len(text), spec.data.context_length,
                              spec.data.validation_fraction).cut]


def unigram_entropy_nats(text: bytes) -> float:
    """The loss of the best model that ignores context: the entropy of the byte frequencies."""
    counts = np.bincount(np.frombuffer(text, dtype=np.uint8), minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def unigram_sample(text: bytes, length: int, seed: int) -> str:
    """Bytes drawn from the text's byte frequencies: what the baseline would write."""
    counts = np.bincount(np.frombuffer(text, dtype=np.uint8), minlength=256)
    rng = np.random.default_rng(seed)
    drawn = rng.choice(256, size=length, p=counts / counts.sum()).astype(np.uint8)
    return bytes(drawn).decode("utf-8", errors="replace")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def known_word_share(sample: str, training_text: bytes) -> float:
    """Of the sample's words of 3 letters or more, the share that occur in the training text
    (a made-up word like "stattern" does not; 0 when there are no such words)."""
    vocabulary = set(words(training_text.decode("utf-8", errors="replace")))
    candidates = [w for w in words(sample) if len(w) >= 3]
    return sum(w in vocabulary for w in candidates) / len(candidates) if candidates else 0.0


def printable_share(sample: str) -> float:
    return sum(c.isprintable() or c in "\n\t" for c in sample) / max(len(sample), 1)


def assert_reads_as_english(sample: str, training_text: bytes) -> None:
    """Mostly printable characters, several common English words, mostly real words."""
    assert printable_share(sample) >= 0.95, sample
    assert len(COMMON_ENGLISH_WORDS & set(words(sample))) >= 3, sample
    assert len([w for w in words(sample) if len(w) >= 3]) >= 20, sample
    assert known_word_share(sample, training_text) >= 0.6, sample
