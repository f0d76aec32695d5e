"""The envelope serde: round trips in both encodings and refusal of malformed payloads."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.errors import BadInputError
from edgefl.proto import envelope_pb2
from edgefl.proto.serde import (
    ENVELOPE_VERSION,
    ENVELOPE_VERSIONS,
    Envelope,
    EnvelopeError,
    canonical_json_body,
    decode_envelope,
    encode_envelope,
    new_incarnation,
    salvage_json_body,
)

ENCODINGS: tuple[Literal["json", "protobuf"], ...] = ("json", "protobuf")

device_ids = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-",
    min_size=1,
    max_size=64,
)
printable = st.characters(exclude_categories=["Cc", "Cs"])
kinds = st.text(alphabet=printable, min_size=1, max_size=64)
other_content_types = st.sampled_from(
    ["", "application/octet-stream", "text/plain", "application/x-protobuf", "image/jpeg"]
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(exclude_categories=["Cs"])),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(alphabet=printable, max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    if draw(st.booleans()):
        content_type = draw(
            st.sampled_from(["application/json", "application/json; charset=utf-8"])
        )
        body = canonical_json_body(draw(json_values))
    else:
        content_type = draw(other_content_types)
        body = draw(st.binary(max_size=512))
    version = draw(st.sampled_from([1, 2]))
    return Envelope(
        version=version,
        incarnation=draw(st.text(alphabet="0123456789abcdef", min_size=32, max_size=32))
        if version == 2
        else "",
        device_id=draw(device_ids),
        seq=draw(st.integers(min_value=1, max_value=2**64 - 1)),
        ts_ms=draw(st.integers(min_value=1, max_value=2**63 - 1)),
        kind=draw(kinds),
        content_type=content_type,
        body=body,
    )


INC = "0123456789abcdef0123456789abcdef"


def _raw_json(**raw: str) -> bytes:
    """A JSON envelope whose fields are given as raw JSON text (to hold what json.dumps
    cannot write: 5000-digit integers, escaped lone surrogates)."""
    fields = {
        "v": "1",
        "device_id": '"pi-01"',
        "seq": "7",
        "ts_ms": "1700000000000",
        "kind": '"telemetry"',
        "content_type": '"application/json"',
        "body": "{}",
    }
    fields.update(raw)
    return ("{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}").encode()


def valid(**overrides: Any) -> Envelope:
    fields: dict[str, Any] = {
        "version": 1,
        "device_id": "pi-01",
        "seq": 7,
        "ts_ms": 1_700_000_000_000,
        "kind": "telemetry",
        "content_type": "application/json",
        "body": b'{"temp":21.5}',
    }
    fields.update(overrides)
    return Envelope(**fields)


def json_doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "v": 1,
        "device_id": "pi-01",
        "seq": 7,
        "ts_ms": 1_700_000_000_000,
        "kind": "telemetry",
        "content_type": "application/json",
        "body": {"temp": 21.5},
    }
    doc.update(overrides)
    return doc


@settings(max_examples=300, deadline=None)
@given(env=envelopes(), encoding=st.sampled_from(ENCODINGS))
def test_round_trip(env: Envelope, encoding: Literal["json", "protobuf"]) -> None:
    assert decode_envelope(encode_envelope(env, encoding)) == env


@settings(max_examples=200, deadline=None)
@given(env=envelopes())
def test_the_two_encodings_agree_and_are_told_apart(env: Envelope) -> None:
    as_json = encode_envelope(env, "json")
    as_proto = encode_envelope(env, "protobuf")
    assert as_json.startswith(b"{")
    assert as_proto[:1] == b"\x08"  # field 1 (version), varint
    assert decode_envelope(as_json) == decode_envelope(as_proto) == env


@settings(max_examples=200, deadline=None)
@given(env=envelopes())
def test_protobuf_encoding_is_the_generated_message(env: Envelope) -> None:
    message = envelope_pb2.Envelope()
    message.ParseFromString(encode_envelope(env, "protobuf"))
    assert (message.version, message.device_id, message.seq, message.ts_ms) == (
        env.version,
        env.device_id,
        env.seq,
        env.ts_ms,
    )
    assert (message.kind, message.content_type, message.body, message.incarnation) == (
        env.kind,
        env.content_type,
        env.body,
        env.incarnation,
    )


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_envelope_error(data: bytes) -> None:
    try:
        env = decode_envelope(data)
    except EnvelopeError:
        return
    assert env.version in ENVELOPE_VERSIONS  # whatever decodes is a valid envelope


@settings(max_examples=200, deadline=None)
@given(env=envelopes(), garbage=st.binary(min_size=1, max_size=16))
def test_trailing_garbage_after_protobuf_is_refused(env: Envelope, garbage: bytes) -> None:
    with pytest.raises(EnvelopeError):
        decode_envelope(encode_envelope(env, "protobuf") + garbage)


def test_json_form_is_readable_and_inline() -> None:
    doc = json.loads(encode_envelope(valid(), "json"))
    assert doc == json_doc()
    binary = valid(content_type="application/octet-stream", body=b"\x00\xff")
    assert json.loads(encode_envelope(binary, "json"))["body"] == base64.b64encode(
        b"\x00\xff"
    ).decode("ascii")


def test_leading_whitespace_json_is_detected() -> None:
    assert decode_envelope(b"  \n" + json.dumps(json_doc()).encode()) == valid()


def test_error_is_bad_input() -> None:
    assert issubclass(EnvelopeError, BadInputError)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty payload"),
        (b"   ", "empty payload"),
        (b"{not json", "invalid JSON"),
        (b'{"v":1} trailing', "invalid JSON"),
        (b"[1,2]", "not a protobuf envelope"),
        (json.dumps(json_doc()).encode() + b"xx", "invalid JSON"),
        (json.dumps(json_doc(extra=1)).encode(), "unknown key(s) ['extra']"),
        (json.dumps({k: v for k, v in json_doc().items() if k != "seq"}).encode(), "missing"),
        (json.dumps(json_doc(v=3)).encode(), "unsupported envelope version 3"),
        (json.dumps(json_doc(v=2)).encode(), "missing key(s) ['incarnation']"),
        (json.dumps(json_doc(incarnation=INC)).encode(), "unknown key(s) ['incarnation']"),
        (json.dumps(json_doc(v=2, incarnation="")).encode(), "not 32 lowercase hex"),
        (json.dumps(json_doc(v=2, incarnation=INC.upper())).encode(), "not 32 lowercase hex"),
        (json.dumps(json_doc(v=2, incarnation=5)).encode(), "must be a string"),
        # Python's int-digit limit (4300) raises a plain ValueError inside json.loads.
        (_raw_json(seq="9" * 5000), "integer has 5000 digits"),
        (_raw_json(ts_ms="-" + "1" * 4400), "integer has 4400 digits"),
        (_raw_json(body='{"x":' + "7" * 5000 + "}"), "integer has 5000 digits"),
        # A lone surrogate is a valid Python str but no UTF-8: refused here, not at the insert.
        (_raw_json(kind='"d\\ud800"'), "lone surrogate"),
        (_raw_json(content_type='"text/\\udfff"', body='""'), "lone surrogate"),
        (_raw_json(body='{"k":"\\ud800"}'), "not serializable as JSON"),
        (_raw_json(body='{"\\udbff":1}'), "not serializable as JSON"),
        (b"[" * 100_000, "not a protobuf envelope"),
        (b"{" + b'"a":[' * 50_000, "invalid JSON"),
        (json.dumps(json_doc(v=True)).encode(), "v must be an integer"),
        (json.dumps(json_doc(seq="7")).encode(), "seq must be an integer"),
        (json.dumps(json_doc(seq=1.0)).encode(), "seq must be an integer"),
        (json.dumps(json_doc(seq=0)).encode(), "seq 0 is out of range"),
        (json.dumps(json_doc(seq=2**64)).encode(), "out of range"),
        (json.dumps(json_doc(ts_ms=0)).encode(), "ts_ms 0 is out of range"),
        (json.dumps(json_doc(kind="")).encode(), "kind must have 1..64"),
        (json.dumps(json_doc(kind="a\x00b")).encode(), "control characters"),
        (json.dumps(json_doc(kind=5)).encode(), "'kind' must be a string"),
        (json.dumps(json_doc(device_id="pi/01")).encode(), "does not match"),
        (json.dumps(json_doc(device_id="x" * 65)).encode(), "does not match"),
        (json.dumps(json_doc(content_type="text/plain", body="@@@")).encode(), "base64"),
        (json.dumps(json_doc(content_type="text/plain", body=[1])).encode(), "base64 string"),
        (b'{"v":1,"v":1}', "duplicate key"),
        (b'{"v":NaN}', "NaN is not allowed"),
        (b'{"v":1, "body": "\xff"}', "not UTF-8"),
        (b"\x08\x01\x12", "not a protobuf envelope"),
        (b"\xff\xff\xff", "not a protobuf envelope"),
        (
            envelope_pb2.Envelope(version=1, device_id="a", seq=1, kind="k").SerializeToString(),
            "ts_ms 0",
        ),
        (
            envelope_pb2.Envelope(
                version=3, device_id="a", seq=1, ts_ms=1, kind="k"
            ).SerializeToString(),
            "unsupported envelope version 3",
        ),
    ],
)
def test_malformed_payloads_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(EnvelopeError) as info:
        decode_envelope(payload)
    assert reason in str(info.value)


def test_unknown_protobuf_field_is_refused() -> None:
    payload = encode_envelope(valid(), "protobuf") + b"\x48\x01"  # field 9 = 1
    with pytest.raises(EnvelopeError, match="unknown, repeated"):
        decode_envelope(payload)


def test_repeated_protobuf_field_is_refused() -> None:
    payload = encode_envelope(valid(), "protobuf") + b"\x3a\x00"  # body again, empty
    with pytest.raises(EnvelopeError, match="unknown, repeated"):
        decode_envelope(payload)


def test_invalid_envelopes_cannot_be_built() -> None:
    with pytest.raises(EnvelopeError, match="device_id"):
        valid(device_id="")
    with pytest.raises(EnvelopeError, match="body must be bytes"):
        valid(body="text")
    with pytest.raises(EnvelopeError, match="content_type"):
        valid(content_type="x" * 256)


def test_json_encoding_needs_a_json_body_for_json_content() -> None:
    with pytest.raises(EnvelopeError, match="not JSON"):
        encode_envelope(valid(body=b"\x00not json"), "json")
    # the protobuf encoding carries any bytes
    env = valid(body=b"\x00not json")
    assert decode_envelope(encode_envelope(env, "protobuf")) == env


def test_unknown_encoding_is_refused() -> None:
    with pytest.raises(EnvelopeError, match="unknown envelope encoding"):
        encode_envelope(valid(), "xml")  # type: ignore[arg-type]


def test_json_body_is_stored_compact() -> None:
    payload = json.dumps(json_doc(body={"a": [1, 2], "b": "é"}), indent=2).encode()
    assert decode_envelope(payload).body == '{"a":[1,2],"b":"é"}'.encode()


def test_version_2_carries_the_incarnation_in_both_encodings() -> None:
    incarnation = new_incarnation()
    assert len(incarnation) == 32
    assert incarnation != new_incarnation()
    env = valid(version=ENVELOPE_VERSION, incarnation=incarnation)
    assert env.key == ("pi-01", incarnation, 7)
    doc = json.loads(encode_envelope(env, "json"))
    assert doc == json_doc(v=2, incarnation=incarnation)
    assert list(doc)[:3] == ["v", "device_id", "incarnation"]
    for encoding in ENCODINGS:
        assert decode_envelope(encode_envelope(env, encoding)) == env


def test_version_1_is_still_read_with_an_empty_incarnation() -> None:
    v1 = decode_envelope(json.dumps(json_doc()).encode())
    assert (v1.version, v1.incarnation, v1.key) == (1, "", ("pi-01", "", 7))
    # what a not-yet-upgraded agent sends over protobuf: fields 1-7 only
    old = envelope_pb2.Envelope(
        version=1, device_id="pi-01", seq=7, ts_ms=1, kind="k", content_type="", body=b""
    ).SerializeToString()
    assert decode_envelope(old).incarnation == ""


def test_version_and_incarnation_must_agree() -> None:
    with pytest.raises(EnvelopeError, match="version-1 envelope has no incarnation"):
        valid(incarnation=INC)
    with pytest.raises(EnvelopeError, match="not 32 lowercase hex"):
        valid(version=2)
    bad = envelope_pb2.Envelope(
        version=1, device_id="a", seq=1, ts_ms=1, kind="k", incarnation=INC
    ).SerializeToString()
    with pytest.raises(EnvelopeError, match="version-1 envelope has no incarnation"):
        decode_envelope(bad)


def test_surrogate_in_kind_cannot_be_built() -> None:
    with pytest.raises(EnvelopeError, match="lone surrogate"):
        valid(kind="d\ud800")


def test_the_fleet_contract_example_is_a_version_2_envelope() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "fleet-contract.md").read_text()
    example = doc.split("```json\n", 1)[1].split("```", 1)[0]
    env = decode_envelope(example.encode())
    assert (env.version, env.device_id, env.seq) == (ENVELOPE_VERSION, "pi-01", 7)
    assert env.key == ("pi-01", "5f0c1d2e3a4b59687766554433221100", 7)
    assert env.body == b'{"temp":21.5}'


def test_a_json_envelope_with_version_for_v_is_refused_naming_the_key() -> None:
    env = Envelope(1, "pi-01", 1, 1, "command", "application/json", b"{}")
    document = json.loads(encode_envelope(env, "json"))
    document["version"] = document.pop("v")
    with pytest.raises(
        EnvelopeError, match=r"unknown key\(s\) \['version'\] \(the version key is 'v'"
    ):
        decode_envelope(json.dumps(document).encode())


def test_salvage_reads_the_body_of_an_invalid_envelope() -> None:
    body = {"correlation_id": "c-1", "expires_at_ms": 5, "args": {}}
    misspelt = {"version": 1, "device_id": "pi 01", "body": body}  # and more wrong
    assert salvage_json_body(json.dumps(misspelt).encode()) == body
    # A valid envelope of another kind, in both encodings.
    env = Envelope(1, "pi-01", 1, 1, "telemetry", "application/json", canonical_json_body(body))
    for encoding in ENCODINGS:
        assert salvage_json_body(encode_envelope(env, encoding)) == body
    # A protobuf envelope whose fields are out of range still has a readable body.
    bad = envelope_pb2.Envelope(version=9, body=canonical_json_body(body))
    assert salvage_json_body(bad.SerializeToString()) == body


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00garbage",
        b"{not json",
        b"[1, 2]",
        b'{"body": [1]}',
        b'{"body": "eyJhIjoxfQ=="}',  # base64 of a JSON object: not read
        b'{"body": {"a": NaN}}',
        b'{"body": {"a": 1, "a": 2}}',
        b'{"body": {"n": ' + b"9" * 5000 + b"}}",
        b"{" * 100_000,
        envelope_pb2.Envelope(body=b"not json").SerializeToString(),
        envelope_pb2.Envelope(body=b"[1]").SerializeToString(),
    ],
)
def test_salvage_returns_none_when_there_is_no_object_body(payload: bytes) -> None:
    assert salvage_json_body(payload) is None


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_salvage_never_raises(data: bytes) -> None:
    result = salvage_json_body(data)
    assert result is None or isinstance(result, dict)
