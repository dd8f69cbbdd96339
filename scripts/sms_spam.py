"""Selects the rows of ``softprompt/data/sms_spam.csv`` from the SMS Spam Collection v.1 (real SMS messages, labelled
``ham`` or ``spam``; see ``softprompt/data/ATTRIBUTION.md`` for the source, licence and citation).

The rule, deterministic and independent of any random generator:

1. read the source file (``SMSSpamCollection``: one ``label<TAB>text`` line per message, UTF-8), checked against its
   pinned SHA-256;
2. strip each text's surrounding whitespace and keep it exactly otherwise (the source's ``&lt;#&gt;`` placeholders
   included);
3. drop every text that occurs more than once in the file (duplicates, and texts given both labels);
4. keep the texts of at most 160 characters (one SMS);
5. per label, keep the `ROWS_PER_LABEL` texts with the smallest SHA-256 (of their UTF-8 bytes);
6. write them all in that hash order as ``text,label`` CSV.

Rewrite the shipped file from a copy of the source::

    python scripts/sms_spam.py PATH/TO/SMSSpamCollection

The source used: ``smsspamcollection/SMSSpamCollection`` of
github.com/SnehaKedia/sms-spam-detection-using-tensorflow-keras at commit ae6d75701433e884ae62bca4bed8eb40c622c3d1
(5,574 lines, as the UCI archive's file; another unrelated copy, MandeepSinghthakur/SpamDetectionMachineLearning,
has the same SHA-256).
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import sys
from pathlib import Path

from softprompt.files import atomic_write_bytes

SOURCE_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
"""SHA-256 of ``SMSSpamCollection`` (477,907 bytes, 5,574 messages: 4,827 ham, 747 spam)."""

LABELS = ("ham", "spam")
"""The source's labels, used as they are."""

ROWS_PER_LABEL = 200
"""Rows kept of each label: 400 in all, balanced, so the majority baseline is 50% and a model that always answers
one label scores no better."""

MAX_CHARACTERS = 160
"""The longest text kept: one SMS."""

OUTPUT = Path(__file__).resolve().parent.parent / "softprompt" / "data" / "sms_spam.csv"
"""The shipped file."""


def select_rows(source: bytes) -> list[tuple[str, str]]:
    """Applies the module's rule to the source file's bytes.

    Args:
        source: the whole ``SMSSpamCollection`` file.

    Returns:
        ``(text, label)`` rows in the order they are written.

    Raises:
        ValueError: the bytes are not the pinned source file, or a line is not ``label<TAB>text``.
    """
    digest = hashlib.sha256(source).hexdigest()
    if digest != SOURCE_SHA256:
        raise ValueError(
            f"source SHA-256 {digest}, expected {SOURCE_SHA256}: not the SMS Spam Collection v.1 file. Fix: pass "
            "SMSSpamCollection from the UCI archive's zip (or the repository named in this script's docstring)."
        )
    messages: list[tuple[str, str]] = []
    for number, line in enumerate(source.decode("utf-8").splitlines(), start=1):
        label, separator, text = line.partition("\t")
        if not separator or label not in LABELS:
            raise ValueError(f"line {number}: {line[:60]!r}: expected 'ham<TAB>text' or 'spam<TAB>text'.")
        messages.append((text.strip(), label))
    occurrences = collections.Counter(text for text, _ in messages)
    candidates = [(text, label) for text, label in messages
                  if occurrences[text] == 1 and 0 < len(text) <= MAX_CHARACTERS]
    rows: list[tuple[str, str]] = []
    for label in LABELS:
        of_label = sorted((text for text, row_label in candidates if row_label == label), key=_text_sha256)
        if len(of_label) < ROWS_PER_LABEL:
            raise ValueError(f"only {len(of_label)} {label} texts pass the rule, expected {ROWS_PER_LABEL}.")
        rows += [(text, label) for text in of_label[:ROWS_PER_LABEL]]
    return sorted(rows, key=lambda row: _text_sha256(row[0]))


def render_csv(rows: list[tuple[str, str]]) -> bytes:
    """The rows as a ``text,label`` CSV (``\\n`` line ends, quoted where needed)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("text", "label"))
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def _text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def main(arguments: list[str]) -> int:
    """Writes `OUTPUT` from the source file named by the one argument; prints the class counts."""
    if len(arguments) != 1:
        print("usage: python scripts/sms_spam.py PATH/TO/SMSSpamCollection", file=sys.stderr)
        return 2
    try:
        rows = select_rows(Path(arguments[0]).read_bytes())
    except (OSError, ValueError) as error:
        print(f"sms_spam.py: error: {error}", file=sys.stderr)
        return 1
    payload = render_csv(rows)
    atomic_write_bytes(OUTPUT, payload)
    counts = collections.Counter(label for _, label in rows)
    print(f"{OUTPUT}: {len(rows)} rows ({', '.join(f'{label} {counts[label]}' for label in LABELS)}), "
          f"{len(payload):,} bytes, SHA-256 {hashlib.sha256(payload).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
