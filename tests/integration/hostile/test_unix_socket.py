"""hpcd's Unix socket against input Django never sends: AMP commands with
fuzzed arguments, unknown commands and raw garbage (hypothesis, against the
live hpcd).  Every question gets an answer or a named error, never AMP's
"Unknown Error" (an exception hpcd did not expect), and the connection and
hpcd live on."""

import socket
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.protocols import amp

from djangoapp import ipc
from djangoapp import protocol as commands

#: Commands whose effects are harmless whatever their arguments (no shells,
#: no launches, no messages to the real agent, no protocol switch).
HARMLESS = [commands.IsClusterOnline, commands.Dispatch, commands.ListFiles, commands.Status,
            commands.FileChecksum, commands.CloseShell]
NAMES = [c.commandName for c in HARMLESS] + [b"LaunchMissiles", b"x" * 200]
VALUES = st.one_of(st.binary(max_size=40),
                   st.sampled_from([b"", b"0", b"1", b"-1", b"True", b"False", b"9" * 30,
                                    b"/", b"..", b"\xff\xfe", b"1.5", b"nan", b"[]", b"2"]))


@st.composite
def boxes(draw):
    name = draw(st.sampled_from(NAMES))
    known = next((c for c in HARMLESS if c.commandName == name), None)
    argument_names = [n for n, _ in known.arguments] if known else []
    box = {}
    for argument in argument_names:
        if draw(st.booleans()) or draw(st.booleans()):  # mostly present
            box[argument] = draw(VALUES)
    for extra in draw(st.lists(st.binary(min_size=1, max_size=12), max_size=3)):
        if not extra.startswith(b"_"):
            box[extra] = draw(VALUES)
    return name, box


def read_box(sock):
    def exact(n):
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("hpcd closed the connection")
            data += chunk
        return data

    box = {}
    while True:
        (n,) = struct.unpack("!H", exact(2))
        if n == 0:
            return box
        key = exact(n)
        (n,) = struct.unpack("!H", exact(2))
        box[key] = exact(n)


def test_fuzzed_amp_commands_are_answered_and_never_hurt_hpcd(hpcd):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(hpcd.socket_path)
    tags = iter(range(1, 10 ** 6))

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(boxes())
    def ask(question):
        name, arguments = question
        tag = str(next(tags)).encode()
        sock.sendall(amp.AmpBox({b"_command": name, b"_ask": tag, **arguments}).serialize())
        answer = read_box(sock)
        if b"_error" in answer:
            assert answer[b"_error"] == tag
            assert answer[b"_error_code"] != b"UNKNOWN", (name, arguments, answer)
        else:
            assert answer.get(b"_answer") == tag, answer

    ask()
    sock.close()


def test_raw_garbage_on_the_unix_socket_costs_one_connection(hpcd, still_serves):
    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.binary(min_size=1, max_size=600))
    def send(garbage):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(hpcd.socket_path)
        sock.sendall(garbage)
        sock.close()

    send()
    # Still answering, on a connection of its own.
    assert ipc.call(commands.IsClusterOnline, cluster_id=still_serves.pk)["token_id"]
