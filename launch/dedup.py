"""Removes low-quality, exactly duplicated and near-duplicated documents from a corpus.

  python launch/dedup.py --input=jsonl:data/*.jsonl.gz#text --output=clean.jsonl \
      --threshold=0.8 --shingle=char --ngram=5 --num_perm=128 --min_length=50

Writes one ``{"text": ...}`` line per kept document, in input order, and logs (and with
``--report`` writes as JSON) the counts removed by each filter. See maxlm/data/dedup.py.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

from maxlm.data import dedup, sources

_INPUT = flags.DEFINE_string("input", None, "Source spec (text:, jsonl:, tfds:, arrayrecord:, builtin:) or a path.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output JSONL path.", required=True)
_REPORT = flags.DEFINE_string("report", None, "Optional path for the JSON report.")
_THRESHOLD = flags.DEFINE_float("threshold", 0.8, "Jaccard similarity at which documents are near duplicates.")
_SHINGLE = flags.DEFINE_enum("shingle", "char", ["char", "word"], "Shingle unit.")
_NGRAM = flags.DEFINE_integer("ngram", 5, "Shingle length in units.")
_NUM_PERM = flags.DEFINE_integer("num_perm", 128, "MinHash permutations.")
_MIN_LENGTH = flags.DEFINE_integer("min_length", 0, "Drop documents shorter than this many characters.")
_MAX_NON_ALNUM = flags.DEFINE_float("max_non_alnum_fraction", 1.0, "Drop documents with a larger fraction of non-alphanumeric (non-space) characters.")
_NO_EXACT = flags.DEFINE_bool("skip_exact", False, "Do not remove exact duplicates separately.")
_ON_BAD_RECORD = flags.DEFINE_enum("on_bad_record", "error", ["error", "skip"], "What to do with unreadable records.")
_TEXT_SPLIT = flags.DEFINE_enum("text_split", "file", ["file", "blank_line"], "Document unit for text: sources.")


def main(argv):
    del argv
    source = sources.make_source(sources.infer_spec(_INPUT.value), on_bad_record=_ON_BAD_RECORD.value,
                                 text_split=_TEXT_SPLIT.value)
    docs = [source[i] for i in range(len(source))]
    config = dedup.DedupConfig(
        threshold=_THRESHOLD.value, shingle=_SHINGLE.value, ngram=_NGRAM.value, num_perm=_NUM_PERM.value,
        min_length=_MIN_LENGTH.value, max_non_alnum_fraction=_MAX_NON_ALNUM.value, exact=not _NO_EXACT.value,
    )
    kept, report = dedup.deduplicate(docs, config)
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    tmp = f"{_OUTPUT.value}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i in kept:
            f.write(json.dumps({"text": docs[i]}, ensure_ascii=False) + "\n")
    os.replace(tmp, _OUTPUT.value)
    report = {"input_spec": _INPUT.value, "output": _OUTPUT.value, **report}
    logging.info("dedup report: %s", report)
    print(json.dumps(report))
    if _REPORT.value:
        with open(_REPORT.value, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    app.run(main)
