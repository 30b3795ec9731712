"""KIDs: parsing, validation and identity KIDs (DESIGN §1.2)."""

import blake3
import pytest

import kid


def test_full_kid_parses_and_exposes_hex():
    k = kid.parse("K-" + "ab" * 20)
    assert k.is_full and k.hex == "ab" * 20 and k == "K-" + "ab" * 20


def test_short_kid_of_eight_digits_is_accepted_only_when_allowed():
    assert not kid.parse("K-1234abcd").is_full
    with pytest.raises(kid.KidError, match="full KID"):
        kid.parse("K-1234abcd", allow_short=False)


@pytest.mark.parametrize("text, message", [
    ("1234abcd", "starts with 'K-'"),
    ("k-1234abcd", "starts with 'K-'"),
    ("K-1234ABCD", "lowercase hex"),
    ("K-12 34abcd", "lowercase hex"),
    ("K-", "lowercase hex"),
    ("K-1234567", "at least 8"),
    ("K-" + "a" * 41, "at most 40"),
])
def test_malformed_kids_are_clear_errors(text, message):
    with pytest.raises(kid.KidError, match=message):
        kid.parse(text)


def test_non_string_kid_is_an_error_not_a_crash():
    with pytest.raises(kid.KidError, match="must be a string"):
        kid.parse(None)


def test_user_identity_is_blake3_of_lowercased_email_cut_to_40_hex():
    expected = "K-" + blake3.blake3(b"user:alice@example.com").hexdigest()[:40]
    assert kid.user_kid("Alice@Example.COM") == expected
    with pytest.raises(kid.KidError):
        kid.user_kid("not-an-email")


def test_machine_and_process_identities_follow_the_design_formula():
    m = kid.machine_kid("node-1")
    assert m == "K-" + blake3.blake3(b"machine:node-1").hexdigest()[:40]
    spec = "K-" + "0" * 40
    p = kid.process_kid(m, "web", spec, 2)
    assert p == "K-" + blake3.blake3(f"proc:{m}:web:{spec}:2".encode()).hexdigest()[:40]
    assert p != kid.process_kid(m, "web", spec, 3)


def test_value_kid_of_git_oid():
    assert kid.from_oid(bytes.fromhex("45b983be36b73c0788dc9cbcb76cbb80fc7bb057")) == \
        "K-45b983be36b73c0788dc9cbcb76cbb80fc7bb057"
