"""GSM8K as a TensorFlow Datasets builder over local JSONL files, read without TensorFlow.

`Gsm8kJsonl` prepares ``train.jsonl`` / ``test.jsonl`` in the original format of
openai/grade-school-math (one ``{"question": ..., "answer": "... #### <number>"}`` object per line)
into the ``array_record`` file format; `tfds.data_source` / `builder.as_data_source()` then give
random access to the records with tensorflow-datasets alone (``pip install rl_jax[data]``), no
TensorFlow. TFDS shuffles records at write time, so every record stores its row `index` in the
source file and `load_split` restores file order.

    examples = load_split("../shared/data/gsm8k", "test", tfds_data_dir="~/.cache/rl_jax/tfds")

The prepared files remember the sha256 of their source file; a changed source is prepared again.
Several processes may share one `tfds_data_dir` (the default cache): they prepare one at a time
(`rl_jax.run_lock.exclusive`), and those that wait find the dataset prepared and read it.

Machines that can download may instead use the official TFDS ``gsm8k`` builder (same rows,
fetched from GitHub): `load_official_split("test", tfds_data_dir)` (also needs the small
``importlib_resources`` package, see there). Its records carry no row index, so its order is
TFDS's write-time order, which is deterministic but not the file order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import decimal
import hashlib
import importlib.util
import io
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from rl_jax.run_lock import exclusive
from rl_jax.tasks.base import VERBOSE_ENV
from rl_jax.tasks.gsm8k_reward import gold_number

SPLITS = ("train", "test")

_CITATION = """@article{cobbe2021gsm8k,
  title={Training Verifiers to Solve Math Word Problems},
  author={Cobbe, Karl and Kosaraju, Vineet and Bavarian, Mohammad and Chen, Mark and Jun, Heewoo
          and Kaiser, Lukasz and Plappert, Matthias and Tworek, Jerry and Hilton, Jacob and
          Nakano, Reiichiro and Hesse, Christopher and Schulman, John},
  journal={arXiv preprint arXiv:2110.14168},
  year={2021}
}"""


@dataclasses.dataclass(frozen=True)
class GSM8KExample:
    """One GSM8K problem: `index` is its row in the source file, `answer` the full answer field."""

    index: int
    question: str
    answer: str

    @property
    def gold(self) -> decimal.Decimal:
        return gold_number(self.answer)


def _parse_row(line: str) -> dict[str, str]:
    """One JSONL line -> {"question", "answer"}; ValueError says what is wrong."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for key in ("question", "answer"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"field {key!r} must be a string, got {row.get(key)!r:.60}")
    gold_number(row["answer"])
    return {"question": row["question"], "answer": row["answer"]}


def read_jsonl(path: str | pathlib.Path) -> list[GSM8KExample]:
    """Reads and validates a GSM8K JSONL file (UTF-8); blank lines are skipped.

    `index` counts the non-blank rows from 0.

    Raises:
      ValueError: naming the file and 1-based line number of the first malformed line (not
        UTF-8, invalid JSON, not an object, a missing or non-string field, no ``#### <number>``
        final answer), or naming a file with no rows at all.
    """
    path = pathlib.Path(path)
    examples = []
    for line_number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{path}:{line_number}: not UTF-8 (byte {raw[error.start]:#04x} at column "
                f"{error.start + 1}); GSM8K files are UTF-8 JSON lines"
            ) from None
        if not line.strip():
            continue
        try:
            row = _parse_row(line)
        except ValueError as error:
            raise ValueError(f"{path}:{line_number}: malformed GSM8K line: {error}") from None
        examples.append(GSM8KExample(index=len(examples), **row))
    if not examples:
        raise ValueError(f"{path} holds no GSM8K problems (it is empty or blank)")
    return examples


def _source_path(jsonl_dir: str | pathlib.Path, split: str) -> pathlib.Path:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    directory = pathlib.Path(jsonl_dir).expanduser()
    if not directory.is_dir():
        raise ValueError(
            f"task_options.data_dir={str(directory)!r} is not a directory; it must hold "
            f"{' and '.join(s + '.jsonl' for s in SPLITS)}"
        )
    path = directory / f"{split}.jsonl"
    if not path.is_file():
        found = sorted(p.name for p in directory.iterdir())
        raise ValueError(
            f"task_options.data_dir={str(directory)!r} has no {path.name} (found {found})"
        )
    return path


def source_fingerprints(jsonl_dir: str | pathlib.Path) -> dict[str, str]:
    """sha256 of each split's source file, keyed by split."""
    return {
        split: hashlib.sha256(_source_path(jsonl_dir, split).read_bytes()).hexdigest()
        for split in SPLITS
    }


class Gsm8kJsonl(tfds.core.GeneratorBasedBuilder):
    """GSM8K from the local JSONL files given as the manual directory (see module doc)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Rows of train.jsonl / test.jsonl with their row index."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put train.jsonl and test.jsonl of openai/grade-school-math (grade_school_math/data) in "
        "the manual directory, e.g. DownloadConfig(manual_dir=...)."
    )

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default probes the `importlib_resources` backport for classes in packages, which
        # Python >= 3.9 installs lack; the answer is simply this file.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Grade School Math 8K word problems (Cobbe et al., 2021).",
            features=tfds.features.FeaturesDict(
                {
                    "index": tfds.features.Scalar(dtype=np.int64, doc="row in the source file"),
                    "question": tfds.features.Text(),
                    "answer": tfds.features.Text(doc="worked solution ending in '#### <n>'"),
                }
            ),
            homepage="https://github.com/openai/grade-school-math",
            citation=_CITATION,
            license="MIT",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        # Validate every file before writing anything, so a malformed line fails with its
        # location instead of inside TFDS's writer.
        source_dir = pathlib.Path(dl_manager.manual_dir)
        self.info.metadata["source_sha256"] = source_fingerprints(source_dir)
        examples = {split: read_jsonl(_source_path(source_dir, split)) for split in SPLITS}
        return {split: self._generate_examples(rows) for split, rows in examples.items()}

    def _generate_examples(self, examples: list[GSM8KExample]):
        for example in examples:
            yield example.index, dataclasses.asdict(example)


def prepare(jsonl_dir: str | pathlib.Path, tfds_data_dir: str | pathlib.Path) -> Gsm8kJsonl:
    """Prepares (once per source content) and returns the builder over `tfds_data_dir`."""
    data_dir = pathlib.Path(tfds_data_dir).expanduser()
    fingerprints = source_fingerprints(jsonl_dir)
    with exclusive(data_dir / f".{Gsm8kJsonl.name}.lock"):  # one preparation at a time
        builder = Gsm8kJsonl(data_dir=str(data_dir), file_format="array_record")
        stale = builder.is_prepared() and builder.info.metadata.get("source_sha256") != fingerprints
        mode = tfds.download.GenerateMode
        mode = mode.REUSE_CACHE_IF_EXISTS if stale else mode.REUSE_DATASET_IF_EXISTS
        config = tfds.download.DownloadConfig(
            manual_dir=str(pathlib.Path(jsonl_dir).expanduser()), download_mode=mode
        )
        builder.download_and_prepare(download_config=config)
    return builder


@contextlib.contextmanager
def _quiet():
    """TFDS's progress bars, its "Downloading and preparing" lines and absl's info and warning
    lines off, unless `RL_JAX_VERBOSE` is set: preparing the data is a one-off step of a few
    seconds that they would fill with raw terminal escapes."""
    if os.environ.get(VERBOSE_ENV):  # the CLI's -v
        yield
        return
    from absl import logging as absl_logging
    from tensorflow_datasets.core.utils import tqdm_utils

    verbosity, bars = absl_logging.get_verbosity(), getattr(tqdm_utils, "_active", True)
    absl_logging.set_verbosity(absl_logging.ERROR)
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl_logging.set_verbosity(verbosity)
        tfds.display_progress_bar(bars)


def data_source(jsonl_dir, split: str, tfds_data_dir):
    """The TFDS array_record data source of `split` (random access; records in write order)."""
    _source_path(jsonl_dir, split)
    with _quiet():
        return prepare(jsonl_dir, tfds_data_dir).as_data_source(split=split)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _examples(records, indices: Sequence[int] | None = None) -> list[GSM8KExample]:
    return [
        GSM8KExample(
            index=int(record["index"]) if indices is None else indices[position],
            question=_text(record["question"]),
            answer=_text(record["answer"]),
        )
        for position, record in enumerate(records)
    ]


def load_split(jsonl_dir, split: str, tfds_data_dir) -> list[GSM8KExample]:
    """The examples of `split` in source-file order, read back through the TFDS data source."""
    source = data_source(jsonl_dir, split, tfds_data_dir)
    records = source.__getitems__(range(len(source)))
    return sorted(_examples(records), key=lambda example: example.index)


def load_official_split(split: str, tfds_data_dir) -> list[GSM8KExample]:
    """`split` of the official TFDS ``gsm8k`` builder; downloads from GitHub on first use.

    `index` is the position in the data source (TFDS write order, not the source-file order).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if importlib.util.find_spec("importlib_resources") is None:
        # tfds 4.9 locates its own builders through this backport but declares it only for
        # Python < 3.9 (our `Gsm8kJsonl.code_path` sidesteps the same probe).
        raise ImportError("the official TFDS gsm8k builder needs `pip install importlib_resources`")
    data_dir = pathlib.Path(tfds_data_dir).expanduser()
    with exclusive(data_dir / ".gsm8k.lock"):  # one download and preparation at a time
        source = tfds.data_source(
            "gsm8k",
            split=split,
            data_dir=str(data_dir),
            builder_kwargs={"file_format": "array_record"},
            download=True,
        )
    records = source.__getitems__(range(len(source)))
    return _examples(records, indices=range(len(records)))
