"""The ssh command line every SSH path shares, and what ssh's complaints are turned into."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ringsync.inventory import Host
from ringsync.transport.ssh_login import Login, connection_lost, login_refusal, ssh_args
from ringsync.transport.ssh_master import Master


@pytest.fixture
def login(tmp_path: Path) -> Login:
    (tmp_path / "kh").write_text("")
    return Login(tmp_path / "kh", connect_timeout=4.0, keepalive_interval=1.5, keepalive_count_max=2)


def peer(tmp_path: Path) -> Host:
    (tmp_path / "key").write_text("")
    return Host("t", ssh_host="10.0.0.5", ssh_port=2222, ssh_user="ubuntu", ssh_key=str(tmp_path / "key"))


def options(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a, flag in zip(args[1:], args, strict=False) if flag == "-o")


def test_the_command_line_takes_only_the_inventory_and_the_settings(tmp_path: Path, login: Login) -> None:
    args = ssh_args(peer(tmp_path), login)
    assert args[:3] == ["ssh", "-p", "2222"]
    assert args[args.index("-F") + 1] == "/dev/null"  # no ~/.ssh/config can change any of it
    assert args[args.index("-l") + 1] == "ubuntu"
    assert args[args.index("-i") + 1] == str(tmp_path / "key")
    opts = options(args)
    assert opts["IdentitiesOnly"] == "yes"
    assert opts["BatchMode"] == "yes"
    assert (opts["StrictHostKeyChecking"], opts["UserKnownHostsFile"], opts["GlobalKnownHostsFile"]) == \
        ("yes", str(tmp_path / "kh"), "/dev/null")
    keepalive = (opts["ServerAliveInterval"], opts["ServerAliveCountMax"])
    assert (opts["ConnectTimeout"], keepalive) == ("4", ("2", "2"))
    assert opts["Ciphers"].split(",")[0] == "aes128-gcm@openssh.com"
    assert opts["LogLevel"] == "ERROR"
    assert options(ssh_args(peer(tmp_path), login, log_level="INFO"))["LogLevel"] == "INFO"


def test_without_a_key_ssh_keeps_its_defaults(tmp_path: Path, login: Login) -> None:
    args = ssh_args(Host("t", ssh_host="h"), login)
    assert "-i" not in args
    assert "-l" not in args
    assert "IdentitiesOnly" not in options(args)


@pytest.mark.parametrize("said", [
    "@@@@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\nHost key verification failed.",
    "No ED25519 host key is known for [10.0.0.5]:2222 and you have requested strict checking.\n"
    "Host key verification failed.",
])
def test_a_host_key_refusal_names_the_host_and_the_fix(tmp_path: Path, login: Login, said: str) -> None:
    message = str(login_refusal(peer(tmp_path), said, login))
    assert message.startswith("t: SSH host key of 10.0.0.5 port 2222 is unknown or has changed")
    assert "nothing was sent" in message
    assert f"ssh-keygen -R '[10.0.0.5]:2222' -f {login.known_hosts}" in message
    assert f"ssh-keyscan -p 2222 10.0.0.5 >> {login.known_hosts}" in message


def test_a_refused_login_and_an_unreachable_host_say_what_to_check(tmp_path: Path, login: Login) -> None:
    denied = str(login_refusal(peer(tmp_path), "ubuntu@10.0.0.5: Permission denied (publickey).", login))
    assert "SSH login to ubuntu@10.0.0.5:2222 refused" in denied
    assert "authorized_keys" in denied
    assert "hosts.t.ssh_user / ssh_key" in denied
    refused = str(login_refusal(peer(tmp_path), "ssh: connect to host 10.0.0.5 port 2222: Connection refused",
                                login, prefix="rsync: "))
    assert refused.startswith("t: rsync: SSH to ubuntu@10.0.0.5:2222 failed (ssh: connect to host")
    assert "hosts.t.ssh_host / ssh_port" in refused


def test_a_keepalive_timeout_is_named_as_one(login: Login) -> None:
    said = ("channel 3: open failed: connect failed: Connection refused\n"
            "Timeout, server 10.0.0.5 not responding.")
    assert connection_lost(said, login) == ("no answer to 2 keepalives 2s apart: "
                                            "Timeout, server 10.0.0.5 not responding.")
    assert connection_lost("Connection to 10.0.0.5 closed by remote host.", login) == \
        "Connection to 10.0.0.5 closed by remote host."
    assert connection_lost("", login) == ""


def test_children_never_inherit_the_cluster_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from ringsync.ops.logsafe import child_env

    monkeypatch.setenv("RINGRIFT_CLUSTER_AUTH_TOKEN", "s3cret-token")
    monkeypatch.setenv("RINGRIFT_SYNC_INTERVAL", "30")
    env = child_env(LC_ALL="C")
    assert "RINGRIFT_CLUSTER_AUTH_TOKEN" not in env
    assert "s3cret-token" not in env.values()
    assert env["RINGRIFT_SYNC_INTERVAL"] == "30"
    assert env["LC_ALL"] == "C"


def test_rsync_dying_with_its_ssh_on_a_changed_host_key_is_a_refusal_not_a_retry(tmp_path: Path) -> None:
    """rsync may exit 12 (stream error) instead of 255 when its ssh refuses the host key."""
    from ringsync.errors import PeerUnreachableError
    from ringsync.transport.rsync import RsyncOptions, _failure

    peer = Host("train-1", ssh_host="10.0.0.5", ssh_port=2222)
    said = ("@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\nHost key verification failed.\n"
            "rsync: connection unexpectedly closed (0 bytes received so far) [Receiver]\n")
    err = _failure(peer, 12, said, RsyncOptions(known_hosts=tmp_path / "kh"))
    assert isinstance(err, PeerUnreachableError)
    assert "ssh-keyscan -p 2222 10.0.0.5" in str(err)
    # a file that cannot be read on the peer is not a login refusal
    other = _failure(peer, 23, "rsync: send_files failed to open \"x\": Permission denied (13)",
                     RsyncOptions(known_hosts=tmp_path / "kh"))
    assert not isinstance(other, PeerUnreachableError)


def test_an_older_refused_channel_does_not_explain_a_new_failure(tmp_path: Path, login: Login) -> None:
    """A master's stderr keeps its last lines; only those after a request's mark explain it."""
    refused = "channel 3: open failed: connect failed: Connection refused"

    async def run() -> tuple[str | None, str | None, str | None]:
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", f"echo '{refused}' >&2; read line; echo '{refused} again' >&2; exec sleep 30",
            stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        master = Master(proc, tmp_path / "ctl", 1, login)

        async def read(lines: int) -> None:
            async with asyncio.timeout(10):
                while master.lines_read < lines:  # noqa: ASYNC110 (the reader task counts them)
                    await asyncio.sleep(0.01)

        try:
            await read(1)
            mark = master.lines_read
            before = master.last_open_failure(mark)  # the old refusal is not this request's
            assert proc.stdin is not None
            proc.stdin.write(b"\n")
            await read(2)
            return master.last_open_failure(0), before, master.last_open_failure(mark)
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            await master.stop()

    any_time, before, after = asyncio.run(run())
    assert any_time == "connect failed: Connection refused again"
    assert before is None
    assert after == "connect failed: Connection refused again"
