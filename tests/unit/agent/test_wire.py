"""The agent <-> hpcd wire schema (hpc_agent.wire): round trips, refusals, fuzz."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpc_agent import wire
from hpc_agent.wire import ProtocolError

REQUESTS = sorted(t for t, (_, _, is_request) in wire.SCHEMA.items() if is_request)
NON_REQUESTS = sorted(t for t, (_, _, is_request) in wire.SCHEMA.items() if not is_request)

# One valid value per field kind (the kinds are module constants, compared by identity).
_SAMPLES = [
    (wire.INT, 7), (wire.STR, "text é"), (wire.BOOL, True), (wire.NUMBER, 1.5),
    (wire.OBJECT, {"k": [1, None]}), (wire.ANY, {"script": "echo hi", "n": [1, 2.5, None]}),
    (wire.OPT_INT, None), (wire.OPT_STR, "slurm-42"), (wire.INT_LIST, [1, 2, 3]),
    (wire.FILE_LIST, [["a/b.txt", False, 12], ["a", True, 0]]),
    (wire.COUNT, 0), (wire.OPT_COUNT, 10), (wire.OPT_LIMIT, None),
    (wire.SUBMIT_LIST, [{"job": 5, "parameters": {"script": "true"}}, {"job": 6,
                                                                     "parameters": "x"}]),
]


def sample(kind):
    for known, value in _SAMPLES:
        if known is kind:
            return value
    raise AssertionError(f"no sample for field kind {kind[0]!r}")


def valid_fields(mtype, with_optional=True):
    required, optional, is_request = wire.SCHEMA[mtype]
    fields = {name: sample(kind) for name, kind in required.items()}
    if with_optional:
        fields.update({name: sample(kind) for name, kind in optional.items()})
    if is_request:
        fields["id"] = 41
    return fields


def decode_obj(obj, **kwargs):
    return wire.decode(json.dumps(obj).encode(), **kwargs)


def refused(obj_or_bytes, **kwargs):
    payload = obj_or_bytes if isinstance(obj_or_bytes, (bytes, str)) else \
        json.dumps(obj_or_bytes).encode()
    with pytest.raises(ProtocolError) as info:
        wire.decode(payload, **kwargs)
    return info.value


# -- round trips ----------------------------------------------------------------

def test_every_kind_of_field_has_a_sample():
    kinds = {id(k) for fields in wire.SCHEMA.values() for part in fields[:2]
             for k in part.values()}
    assert kinds <= {id(k) for k, _ in _SAMPLES}


@pytest.mark.parametrize("mtype", sorted(wire.SCHEMA))
@pytest.mark.parametrize("with_optional", [False, True])
def test_every_message_type_round_trips_through_encode_and_decode(mtype, with_optional):
    fields = valid_fields(mtype, with_optional)
    frame = wire.encode(mtype, **fields)
    assert isinstance(frame, bytes)
    assert wire.decode(frame) == {"type": mtype, **fields}
    assert wire.decode(frame.decode("utf-8")) == {"type": mtype, **fields}


def test_every_message_type_is_sent_by_some_side():
    assert set(wire.SCHEMA) == wire.FROM_AGENT | wire.FROM_HPCD


def test_encode_refuses_what_a_receiver_would_refuse():
    with pytest.raises(ProtocolError) as info:
        wire.encode("cancel", id=1, job="7")
    assert info.value.code == "bad_field"
    with pytest.raises(ProtocolError):
        wire.encode("no_such_type")


# -- refusals -------------------------------------------------------------------

@pytest.mark.parametrize("payload", [
    b"", b"not json", b"\xff\xfe{}", b"[1, 2]", b'"hello"', b"3", b"null",
    b'{"no": "type"}', b'{"type": 5}', b'{"type": null, "id": 3}',
    b'{"type": "update", "seq": 1', b"[" * 100000 + b"]" * 100000,
])
def test_frames_that_are_not_typed_json_objects_are_bad_frames(payload):
    error = refused(payload)
    assert error.code == "bad_frame"
    assert error.request_id is None


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused_even_in_free_form_fields(constant):
    payload = ('{"type":"submit","id":1,"job":2,"parameters":{"x":%s}}' % constant).encode()
    error = refused(payload)
    assert error.code == "bad_frame"


def test_an_overflowing_number_is_refused_like_infinity():
    error = refused(b'{"type":"submit","id":1,"job":2,"parameters":{"x":1e400}}')
    assert error.code == "bad_frame"


def test_a_non_finite_update_time_is_refused():
    error = refused(b'{"type":"update","seq":1,"job":1,"status":50,"detail":"",'
                    b'"at":1e400,"scheduler_id":null}')
    assert error.code in ("bad_field", "bad_frame")


def test_unknown_type_is_refused_and_its_readable_id_kept_for_a_reply():
    error = refused({"type": "reboot", "id": 9})
    assert (error.code, error.request_id) == ("unknown_type", 9)
    assert refused({"type": "reboot"}).request_id is None


def test_an_oversize_frame_is_refused_before_parsing():
    frame = wire.encode("cancel", id=3, job=4)
    error = refused(frame, max_size=len(frame) - 1)
    assert error.code == "too_large"
    assert error.request_id is None  # never parsed, so no id to answer
    assert wire.decode(frame, max_size=len(frame))["job"] == 4


def test_the_default_size_limit_is_the_control_message_limit():
    padding = "x" * wire.MAX_CONTROL_MESSAGE
    assert refused(json.dumps({"type": "error", "code": "c", "message": padding})
                   ).code == "too_large"


@pytest.mark.parametrize("mtype", REQUESTS)
def test_a_request_with_a_missing_field_is_bad_field_answerable_by_id(mtype):
    fields = valid_fields(mtype)
    for name in wire.SCHEMA[mtype][0]:
        broken = {"type": mtype, **{k: v for k, v in fields.items() if k != name}}
        error = refused(broken)
        assert (error.code, error.request_id) == ("bad_field", 41)
        assert repr(name) in error.message


@pytest.mark.parametrize("mtype", REQUESTS)
def test_a_request_with_a_mistyped_field_is_bad_field_answerable_by_id(mtype):
    fields = valid_fields(mtype)
    for name, kind in wire.SCHEMA[mtype][0].items():
        if kind is wire.ANY:
            continue
        wrong = next(v for v in ("s", 1.5, [1], {"a": 1}, True, -1) if not kind[1](v))
        error = refused({"type": mtype, **fields, name: wrong})
        assert (error.code, error.request_id) == ("bad_field", 41)


@pytest.mark.parametrize("mtype", REQUESTS)
def test_a_request_without_an_integer_id_is_bad_field_without_request_id(mtype):
    fields = valid_fields(mtype)
    for bad_id in (None, "41", 41.0, True):
        error = refused({"type": mtype, **fields, "id": bad_id})
        assert (error.code, error.request_id) == ("bad_field", None)
    del fields["id"]
    assert refused({"type": mtype, **fields}).request_id is None


@pytest.mark.parametrize("mtype", NON_REQUESTS)
def test_a_malformed_non_request_never_carries_a_request_id(mtype):
    fields = valid_fields(mtype)
    fields["id"] = 5  # even when it happens to have one (a reply does)
    for name in wire.SCHEMA[mtype][0]:
        if name == "id":
            continue
        error = refused({"type": mtype, **{k: v for k, v in fields.items() if k != name}})
        assert (error.code, error.request_id) == ("bad_field", None)


def test_a_reply_with_a_mistyped_optional_field_is_bad_field_without_request_id():
    error = refused({"type": "reply", "id": 3, "ok": False, "error": 12})
    assert (error.code, error.request_id) == ("bad_field", None)


@pytest.mark.parametrize("mtype,field", [
    ("cancel", "job"), ("update", "seq"), ("update", "status"), ("welcome", "protocol"),
    ("file_done", "size"), ("list_files", "job"),
])
@pytest.mark.parametrize("value", [True, False])
def test_booleans_are_not_accepted_as_integers(mtype, field, value):
    message = {"type": mtype, **valid_fields(mtype), field: value}
    assert refused(message).code == "bad_field"


def test_booleans_are_not_integers_in_lists_and_file_entries_either():
    assert refused({"type": "ack", "seqs": [1, True]}).code == "bad_field"
    bad_lists = ([["a", False, True]], [["a", 0, 1]], [["a", False, -1]], [["a", False]])
    for files in bad_lists:
        assert not wire.FILE_LIST[1](files)
    assert wire.FILE_LIST[1]([["a", True, 0]])


def test_file_entries_may_carry_an_mtime_as_a_fourth_element():
    assert wire.FILE_LIST[1]([["a", False, 3, 1700000000.5], ["b", True, 0]])
    assert not wire.FILE_LIST[1]([["a", False, 3, "yesterday"]])
    assert not wire.FILE_LIST[1]([["a", False, 3, 1.0, "extra"]])


@pytest.mark.parametrize("mtype,field,value", [
    ("list_files", "offset", -1), ("list_files", "limit", 0), ("list_files", "with_mtime", 1),
    ("fetch_file", "offset", -5), ("fetch_file", "length", -1), ("fetch_file", "offset", None),
    ("welcome", "resume_grace_seconds", "15"), ("ack", "retry", [1, "2"]),
    ("file_header", "total_size", 1.5),
])
def test_the_new_optional_fields_are_checked(mtype, field, value):
    assert refused({"type": mtype, **valid_fields(mtype), field: value}).code == "bad_field"


def test_the_new_optional_fields_may_be_left_out_by_an_older_peer():
    for mtype in ("welcome", "ack", "list_files", "fetch_file", "file_header"):
        assert wire.decode(wire.encode(mtype, **valid_fields(mtype, with_optional=False)))


def test_a_boolean_is_not_accepted_as_a_number():
    frame = {"type": "update", "seq": 1, "job": 1, "status": 50, "detail": "",
             "at": True, "scheduler_id": None}
    assert refused(frame).code == "bad_field"


# -- who may send what ----------------------------------------------------------

@pytest.mark.parametrize("mtype", sorted(wire.FROM_HPCD - wire.FROM_AGENT))
def test_hpcd_refuses_messages_only_hpcd_sends(mtype):
    error = refused(wire.encode(mtype, **valid_fields(mtype)), accept=wire.FROM_AGENT)
    assert error.code == "unknown_type"
    assert error.request_id == (41 if wire.SCHEMA[mtype][2] else None)


@pytest.mark.parametrize("mtype", sorted(wire.FROM_AGENT - wire.FROM_HPCD))
def test_the_agent_refuses_messages_only_the_agent_sends(mtype):
    error = refused(wire.encode(mtype, **valid_fields(mtype)), accept=wire.FROM_HPCD)
    assert (error.code, error.request_id) == ("unknown_type", None)


@pytest.mark.parametrize("accept", [wire.FROM_AGENT, wire.FROM_HPCD])
def test_each_side_accepts_its_peers_messages(accept):
    for mtype in accept:
        assert wire.decode(wire.encode(mtype, **valid_fields(mtype)), accept=accept)["type"] \
            == mtype


def test_the_direction_sets_are_as_documented():
    assert wire.FROM_AGENT == {"hello", "update", "reply", "error", "file_header",
                               "file_end", "file_error", "upload_ready", "upload_done"}
    assert wire.FROM_HPCD == {"welcome", "ack", "submit", "submit_many", "cancel", "delete",
                              "list_files", "fetch_file", "file_checksum", "upload_file",
                              "error", "reply", "file_done", "upload_end"}
    assert wire.TRANSFER_FROM_AGENT < wire.FROM_AGENT
    assert wire.TRANSFER_FROM_HPCD < wire.FROM_HPCD


def test_an_upload_round_trips_in_the_order_the_connection_carries_it():
    frames = [
        ("upload_file", {"id": 3, "job": 12, "path": "in/data.csv", "token": "t",
                         "max_size": 2 ** 40}, wire.FROM_HPCD),
        ("upload_ready", {}, wire.TRANSFER_FROM_AGENT),
        ("upload_end", {"size": 5, "sha256": "ab" * 32}, wire.TRANSFER_FROM_HPCD),
        ("upload_done", {"size": 5, "sha256": "ab" * 32, "mtime": 1.7e9},
         wire.TRANSFER_FROM_AGENT),
    ]
    for mtype, fields, accept in frames:
        assert wire.decode(wire.encode(mtype, **fields), accept=accept) == \
            {"type": mtype, **fields}
    with pytest.raises(ProtocolError):
        wire.encode("upload_file", id=3, job=None, path="x", token="t")  # a job's only
    with pytest.raises(ProtocolError):
        wire.encode("upload_file", id=3, job=1, path="x", token="t", max_size=-1)


# -- answering errors -----------------------------------------------------------

def test_error_frame_answers_a_request_with_a_failed_reply():
    error = refused({"type": "cancel", "id": 12, "job": "x"})
    answer = wire.decode(wire.error_frame(error))
    assert answer == {"type": "reply", "id": 12, "ok": False, "error": "bad_field",
                      "message": error.message}


def test_error_frame_answers_a_non_request_with_an_error_message():
    error = refused({"type": "update", "seq": "1"})
    answer = wire.decode(wire.error_frame(error))
    assert answer == {"type": "error", "code": "bad_field", "message": error.message}


def test_error_frame_answers_an_unparseable_frame_with_an_error_message():
    answer = wire.decode(wire.error_frame(refused(b"\x00garbage")))
    assert answer["type"] == "error" and answer["code"] == "bad_frame"


def test_error_frame_never_answers_a_reply_with_a_reply():
    error = refused({"type": "reply", "id": 4, "ok": "yes"})
    assert wire.decode(wire.error_frame(error))["type"] == "error"


# -- fuzz -----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)

ACCEPTS = st.sampled_from([None, wire.FROM_AGENT, wire.FROM_HPCD])


def check_decode(payload, accept):
    """decode raises only ProtocolError; what it accepts re-encodes to itself."""
    try:
        message = wire.decode(payload, accept=accept)
    except ProtocolError as e:
        assert isinstance(e.code, str) and isinstance(e.message, str)
        assert e.request_id is None or isinstance(e.request_id, int)
        wire.decode(wire.error_frame(e))  # always answerable
        return None
    assert isinstance(message, dict) and message["type"] in wire.SCHEMA
    fields = {k: v for k, v in message.items() if k != "type"}
    again = wire.encode(message["type"], **fields)
    assert wire.decode(again, accept=accept) == message
    return message


FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300), ACCEPTS)
def test_fuzz_arbitrary_bytes_raise_only_protocol_errors(payload, accept):
    check_decode(payload, accept)


@FUZZ
@given(json_values, ACCEPTS)
def test_fuzz_arbitrary_json_values_raise_only_protocol_errors(value, accept):
    check_decode(json.dumps(value).encode(), accept)


@st.composite
def mutated_frames(draw):
    mtype = draw(st.sampled_from(sorted(wire.SCHEMA)))
    message = {"type": mtype, **valid_fields(mtype, draw(st.booleans()))}
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["drop", "alter", "add"]))
        keys = sorted(message)
        if action == "drop" and keys:
            del message[draw(st.sampled_from(keys))]
        elif action == "alter" and keys:
            message[draw(st.sampled_from(keys))] = draw(json_values)
        else:
            message[draw(st.text(max_size=8))] = draw(json_values)
    return message


@FUZZ
@given(mutated_frames(), ACCEPTS)
def test_fuzz_mutated_valid_frames_raise_only_protocol_errors(message, accept):
    check_decode(json.dumps(message).encode(), accept)


@FUZZ
@given(st.sampled_from(sorted(wire.SCHEMA)), json_values)
def test_fuzz_a_frame_with_a_field_changed_is_refused_unless_still_valid(mtype, value):
    fields = valid_fields(mtype)
    required, _, is_request = wire.SCHEMA[mtype]
    for name, (_, ok) in required.items():
        message = {"type": mtype, **fields, name: value}
        decoded = check_decode(json.dumps(message).encode(), None)
        assert (decoded is not None) == ok(value)
