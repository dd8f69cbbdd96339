"""The shipped real dataset softprompt/data/sms_spam.csv: what scripts/sms_spam.py's rule promises of it, checked on
the file itself (the 478 KB source is not shipped; the script regenerates the file from it)."""

from __future__ import annotations

import collections
import csv
import hashlib
import re
from pathlib import Path

import sms_spam

DATA = Path(sms_spam.__file__).resolve().parent.parent / "softprompt" / "data"


def test_the_file_is_400_distinct_short_real_messages_200_of_each_label_in_hash_order():
    payload = (DATA / "sms_spam.csv").read_bytes()
    with (DATA / "sms_spam.csv").open(newline="", encoding="utf-8") as file:
        rows = [(row["text"], row["label"]) for row in csv.DictReader(file)]
    assert collections.Counter(label for _, label in rows) == {"ham": 200, "spam": 200}
    texts = [text for text, _ in rows]
    assert len(set(texts)) == 400 and all(0 < len(text) <= sms_spam.MAX_CHARACTERS for text in texts)
    assert all(text == text.strip() for text in texts)
    digests = [hashlib.sha256(text.encode()).hexdigest() for text in texts]
    assert digests == sorted(digests)
    assert sms_spam.render_csv(rows) == payload  # the script's writer reproduces the file byte for byte
    assert len(payload) < 100_000


def test_the_attribution_names_the_source_licence_and_the_files_hashes():
    attribution = (DATA / "ATTRIBUTION.md").read_text()
    payload = (DATA / "sms_spam.csv").read_bytes()
    for expected in ("CC BY 4.0", "10.24432/C5CC84", "Almeida", "Gómez Hidalgo", "200 ham, 200 spam",
                     "SnehaKedia/sms-spam-detection-using-tensorflow-keras", "ae6d75701433e884ae62bca4bed8eb40c622c3d1",
                     sms_spam.SOURCE_SHA256, hashlib.sha256(payload).hexdigest(), f"{len(payload):,} bytes"):
        assert expected in attribution, expected
    assert re.search(r"`python scripts/sms_spam\.py PATH/TO/SMSSpamCollection`", attribution)


def test_the_rule_refuses_another_source_file():
    try:
        sms_spam.select_rows(b"ham\tnot the collection\n")
    except ValueError as error:
        assert "not the SMS Spam Collection v.1 file" in str(error)
    else:
        raise AssertionError("select_rows accepted a file that is not the pinned source")
