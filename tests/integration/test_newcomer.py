"""A newcomer's first ten minutes: the README followed word for word on a fresh machine.

`make help` lists every target; setup steps started together take turns (one pip at a time in one venv);
`make test` installs the system packages its tests need or says exactly how; `make run` logs text and says
when it is ready, without warnings a user cannot act on; a taken port ends in one line naming the port and
how to choose another; the services' `--help` explains them and their settings.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from tests.support.stack import REPO_DIR, start_command, stop_process_group, user_env

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- make help and the README's targets table ---------------------------------------------------------------


def _makefile_targets() -> set[str]:
    """Every target a user can name: rule lines of the Makefile, not variables, files or internal steps."""
    targets = set()
    for line in (REPO_DIR / "Makefile").read_text().splitlines():
        match = re.match(r"^([a-z][a-zA-Z0-9_-]*)\s*:(?!=)", line)
        if match:
            targets.add(match.group(1))
    return targets


def test_make_help_lists_every_target_with_a_description():
    targets = _makefile_targets()
    assert {"help", "install", "run", "test", "demo-media", "format", "clean", "chart-tools"} <= targets
    result = subprocess.run(
        ["make", "--no-print-directory", "help"], cwd=REPO_DIR, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    listed = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^\s+make (\S+)\s*(.*)$", line)
        if match:
            listed[match.group(1)] = match.group(2).strip()
    assert set(listed) == targets, f"missing: {targets - set(listed)}, unknown: {set(listed) - targets}"
    assert all(listed.values()), [name for name, description in listed.items() if not description]


def test_readme_make_targets_table_has_every_target():
    text = (REPO_DIR / "README.md").read_text()
    section = text[text.index("\n## Make targets\n") :]
    section = section[: section.find("\n## ", 10)]
    in_table = set(re.findall(r"^\| `make ([a-z][\w-]*)", section, flags=re.M))
    targets = _makefile_targets()
    assert in_table == targets, f"missing: {targets - in_table}, unknown: {in_table - targets}"


# -- setup steps started together take turns ----------------------------------------------------------------

FAKE_PYTHON = r"""#!/usr/bin/env python3
# Stands in for python3: `-m venv DIR` copies this script to DIR/bin/python, `-m pip ...` is slow and logs
# when it starts and ends (and whether another pip was running meanwhile).
import os, shutil, sys, time
log = os.environ["FAKE_LOG"]
def note(text):
    with open(log, "a") as f:
        f.write(text + "\n")
args = sys.argv[1:]
if args[:2] == ["-m", "venv"]:
    note(f"venv {os.getpid()}")
    os.makedirs(os.path.join(args[2], "bin"), exist_ok=True)
    time.sleep(0.5)
    target = os.path.join(args[2], "bin", "python")
    shutil.copy(sys.argv[0], target + ".tmp"); os.replace(target + ".tmp", target)
elif args[:3] == ["-m", "pip", "--version"]:
    pass
elif args[:3] == ["-m", "pip", "install"]:
    busy = os.path.join(os.path.dirname(log), "pip.busy")
    try:
        fd = os.open(busy, os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        note("OVERLAP"); sys.exit(1)
    note(f"pip start {os.getpid()} {' '.join(args[3:])}")
    time.sleep(1.0)
    note(f"pip end {os.getpid()}")
    os.close(fd); os.remove(busy)
else:
    sys.exit(f"fake python: unexpected {args}")
"""


def test_installs_started_together_take_turns_and_run_once(tmp_path):
    """Three `make install` at once (as `make run` and `make serve-demo-media` started in two shells do):
    never two pips into one venv, and the later ones find the work done."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(REPO_DIR / name, tmp_path / name)
    (tmp_path / "protos").mkdir()
    python = tmp_path / "fake-python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    log = tmp_path / "calls.log"
    env = user_env(FAKE_LOG=str(log))

    def make_install() -> subprocess.Popen:
        args = ["make", "--no-print-directory", "install", f"PYTHON={python}"]
        return subprocess.Popen(
            args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    makes = [make_install() for _ in range(3)]
    outputs = [m.communicate(timeout=60)[0] for m in makes]
    assert [m.returncode for m in makes] == [0, 0, 0], outputs
    calls = log.read_text().splitlines()
    assert "OVERLAP" not in calls, calls
    assert len([c for c in calls if c.startswith("venv")]) == 1, calls
    starts = [c for c in calls if c.startswith("pip start")]
    assert len(starts) == 2 and "-e .[gateway,worker,dev]" in starts[1], calls  # upgrade pip, then install

    # Whether one of the three had to wait depends on timing; a make that finds the lock held must say so.
    # (flock(1) locks with flock(2), as fcntl.flock does.)
    with open(tmp_path / ".stamps" / "setup.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = make_install()
        ready, _, _ = select.select([waiting.stdout], [], [], 60)
        assert ready, "make printed nothing while the setup lock was held"
        assert "waiting for another make to finish setting up" in waiting.stdout.readline()
        assert waiting.poll() is None  # it waits for the lock
    assert waiting.wait(timeout=60) == 0


# -- system packages for `make test` -------------------------------------------------------------------------

# The commands .ci/system-tools looks for, and their Debian packages.
TOOLS = (
    "promtool",
    "prometheus",
    "podman",
    "buildah",
    "runc",
    "debootstrap",
    "node",
    "npm",
    "curl",
    "openssl",
)
PACKAGES = {"prometheus", "podman", "buildah", "runc", "debootstrap", "nodejs", "npm", "curl", "openssl"}
SBIN = ("/usr/sbin", "/sbin")  # .ci/system-tools looks there too (runc, debootstrap), whatever the PATH


def _expected_packages() -> set[str]:
    """PACKAGES but those whose command this machine has in SBIN (the bare PATH cannot hide them)."""
    found = {tool for tool in ("runc", "debootstrap") if any(Path(d, tool).exists() for d in SBIN)}
    return PACKAGES - found


def _bare_machine(tmp_path: Path, uid: int) -> dict[str, str]:
    """A PATH with bash and coreutils but none of the tools, an `id` saying ``uid``, and an `apt-get` that
    logs its arguments and, for `install`, puts every tool in place."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "env", "sort", "tr", "cat", "mkdir", "touch"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    (bin_dir / "id").write_text(f"#!/bin/bash\necho {uid}\n")
    tools = " ".join(TOOLS)
    (bin_dir / "apt-get").write_text(
        "#!/bin/bash\n"
        f'echo "$*" >> {tmp_path}/apt.log\n'
        f'if [ "$1" = install ]; then for t in {tools}; do '
        f"printf '#!/bin/bash\\n' > {bin_dir}/$t; /bin/chmod +x {bin_dir}/$t; done; fi\n"
    )
    for name in ("id", "apt-get"):
        (bin_dir / name).chmod(0o755)
    return {"PATH": str(bin_dir), "HOME": str(tmp_path)}


def _system_tools(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/bin/bash", str(REPO_DIR / ".ci" / "system-tools")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_system_tools_as_root_installs_what_is_missing_with_apt(tmp_path):
    env = _bare_machine(tmp_path, uid=0)
    result = _system_tools(env)
    assert result.returncode == 0, result.stdout + result.stderr
    update, install = (tmp_path / "apt.log").read_text().splitlines()
    assert update.startswith("update")
    words = install.split()
    assert words[:3] == ["install", "-y", "--no-install-recommends"], install
    assert _expected_packages() == set(words[3:]) - {"-qq"}, install
    # Everything there now: nothing to do, and quick.
    (tmp_path / "apt.log").unlink()
    started = time.monotonic()
    again = _system_tools(env)
    assert again.returncode == 0 and not (tmp_path / "apt.log").exists()
    assert time.monotonic() - started < 15  # no apt-get (which takes a minute): a loaded machine's margin


def test_system_tools_without_root_fails_up_front_with_the_exact_command(tmp_path):
    result = _system_tools(_bare_machine(tmp_path, uid=1000))
    assert result.returncode == 1
    assert not (tmp_path / "apt.log").exists()
    (command,) = [line.strip() for line in result.stderr.splitlines() if "apt-get install" in line]
    assert command.startswith("sudo apt-get update && sudo apt-get install -y --no-install-recommends ")
    assert set(command.split("--no-install-recommends ")[1].split()) == _expected_packages(), command


def test_make_test_installs_the_system_tools_first():
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "test"],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        env=user_env(),
    )
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    first_pytest = next(i for i, line in enumerate(lines) if "-m pytest" in line)
    assert any("_system-tools" in line for line in lines[:first_pytest]), dry.stdout
    assert "OMNIGATE_IMAGE_TESTS" not in (REPO_DIR / "Makefile").read_text()


SKIPPING_TESTS = """
import pytest

def test_runs():
    pass

def test_a_tool_is_missing():
    pytest.skip("promtool is not installed")

@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_on_a_gpu():
    pass
"""


def test_ci_fails_a_run_in_which_a_test_skipped_for_another_reason_than_cuda(tmp_path):
    assert "OMNIGATE_TESTS_NO_SKIPS=1 make test" in (REPO_DIR / ".ci" / "run").read_text()
    (tmp_path / "test_skipping.py").write_text(SKIPPING_TESTS)
    statuses = {}
    for value in ("0", "1"):
        result = subprocess.run(
            # tests/conftest.py as a plugin, for a test file outside tests/
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", "-c", os.devnull,
             "--rootdir", str(tmp_path), "test_skipping.py"],
            cwd=tmp_path,
            env=user_env(PYTHONPATH=f"{REPO_DIR / 'tests'}{os.pathsep}{REPO_DIR}", OMNIGATE_TESTS_NO_SKIPS=value),
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
        statuses[value] = result.returncode
        assert "1 passed, 2 skipped" in result.stdout, result.stdout + result.stderr
    assert statuses == {"0": 0, "1": 1}
    assert "test_skipping.py::test_a_tool_is_missing: Skipped: promtool is not installed" in result.stdout
    assert "test_on_a_gpu" not in result.stdout.split("every test runs here")[1]


# -- the services' --help --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "what", "settings"),
    [
        (
            "omnigate-gateway",
            "The Omnigate gateway",
            {"OMNIGATE_GATEWAY_WORKER_TARGET": "127.0.0.1:50061", "OMNIGATE_GATEWAY_HTTP_PORT": "8000"},
        ),
        (
            "omnigate-worker",
            "The Omnigate worker",
            {"OMNIGATE_WORKER_MODEL": "models/tiny-qwen2.5-omni", "OMNIGATE_WORKER_MAX_BATCH_SIZE": "32"},
        ),
    ],
)
def test_help_says_what_the_service_does_and_lists_settings_as_env_vars(command, what, settings):
    result = subprocess.run(
        [str(BIN / command), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=user_env(COLUMNS="200"),
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith(f"usage: {command} ") and what in text
    assert "Built once in" not in text and "``" not in text  # not the settings class's docstring
    # One entry per setting: "--flag type  description (default: ...) [env: VARIABLE]", wrapped.
    entries = [" ".join(entry.split()) for entry in re.split(r"\n(?=  --)", text.split("\noptions:\n")[1])]
    for env_var, default in settings.items():
        (entry,) = [entry for entry in entries if f"[env: {env_var}]" in entry]
        assert f"(default: {default})" in entry, entry
        assert re.match(r"--[a-z-]+ \w+ [A-Z]", entry), entry  # flag, type, then the description


@pytest.mark.parametrize("command", ["omnigate-gateway", "omnigate-worker"])
def test_an_invalid_setting_is_one_message_not_a_traceback(command):
    prefix = "OMNIGATE_GATEWAY_" if command == "omnigate-gateway" else "OMNIGATE_WORKER_"
    result = subprocess.run(
        [str(BIN / command)],
        capture_output=True,
        text=True,
        timeout=120,
        env=user_env(**{f"{prefix}PORT": "fifty", f"{prefix}METRICS_PORT": "-1"}),
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{prefix}PORT (--port): Input should be a valid integer" in result.stderr, result.stderr


# -- a taken port -----------------------------------------------------------------------------------------

GATEWAY = ("omnigate_gateway.main", "OMNIGATE_GATEWAY_")
WORKER = ("omnigate_worker.main", "OMNIGATE_WORKER_")
# (service, setting taken, what the message calls it, the make variable of `make run`)
PORTS = [
    (GATEWAY, "PORT", "gateway gRPC", "GATEWAY_PORT"),
    (GATEWAY, "METRICS_PORT", "gateway metrics", "GATEWAY_METRICS_PORT"),
    (GATEWAY, "HTTP_PORT", "HTTP API", "HTTP_PORT"),
    (GATEWAY, "HEALTH_PORT", "gateway health", None),
    (WORKER, "PORT", "worker gRPC", "WORKER_PORT"),
    (WORKER, "METRICS_PORT", "worker metrics", "WORKER_METRICS_PORT"),
    (WORKER, "HEALTH_PORT", "worker health", None),
]


@contextlib.contextmanager
def _taken_port(by_grpc: bool = False):
    """A loopback port another process listens on: a plain socket, or a gRPC server (which binds with
    SO_REUSEPORT, so a second gRPC server on that port would not fail by itself)."""
    if by_grpc:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            yield port
        finally:
            server.stop(None)
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            yield sock.getsockname()[1]


def _start_on(service, setting: str, port: int) -> subprocess.CompletedProcess:
    module, prefix = service
    env = {f"{prefix}{name}": "0" for name in ("PORT", "METRICS_PORT", "HTTP_PORT")}
    env |= {f"{prefix}{setting}": str(port), f"{prefix}LOG_FORMAT": "text"}
    if module == WORKER[0]:
        env["OMNIGATE_WORKER_MODEL"] = str(REPO_DIR / "models" / "no-such-model")  # never reached
    return subprocess.run(
        [sys.executable, "-m", module], capture_output=True, text=True, timeout=120, env=user_env(**env)
    )


@pytest.mark.slow
@pytest.mark.parametrize(("service", "setting", "what", "make_variable"), PORTS, ids=[
    f"{s[1].lower().split('_')[1]}-{setting.lower()}" for s, setting, *_ in PORTS
])  # fmt: skip
def test_a_taken_port_ends_in_one_line_naming_it_and_the_override(service, setting, what, make_variable):
    with _taken_port() as port:
        result = _start_on(service, setting, port)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert f"port {port} is in use ({what} on 127.0.0.1)" in line, line
    assert f"{service[1]}{setting}=..." in line, line
    if make_variable:
        assert f"make run {make_variable}=..." in line, line


@pytest.mark.slow
@pytest.mark.parametrize("service", [GATEWAY, WORKER], ids=["gateway", "worker"])
def test_a_grpc_port_another_grpc_server_holds_is_refused_too(service):
    """Without the check, gRPC's SO_REUSEPORT let a second `make run` share the first one's gRPC port."""
    with _taken_port(by_grpc=True) as port:
        result = _start_on(service, "PORT", port)
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"port {port} is in use" in result.stderr, result.stderr[-3000:]


# -- make run: text logs, one ready line, no noise; a taken port through make ----------------------------


def _make_run(ports: dict[str, int], log: Path) -> subprocess.Popen:
    return start_command(
        ["make", "--no-print-directory", "run", *(f"{n}={p}" for n, p in ports.items())], log
    )


def _run_ports() -> dict[str, int]:
    names = ("GATEWAY_PORT", "WORKER_PORT", "GATEWAY_METRICS_PORT", "WORKER_METRICS_PORT", "HTTP_PORT")
    return {name: _free_port() for name in names}


@pytest.mark.slow
def test_make_run_logs_text_and_one_ready_line_without_warning_noise(tmp_path):
    ports = _run_ports()
    log = tmp_path / "run.log"
    run = _make_run(ports, log)
    ready = f"Omnigate is ready: gRPC 127.0.0.1:{ports['GATEWAY_PORT']}, HTTP http://127.0.0.1:{ports['HTTP_PORT']}/v1"
    try:
        deadline = time.monotonic() + 300
        while ready not in log.read_text(errors="replace"):
            assert run.poll() is None, log.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
            time.sleep(0.5)
        time.sleep(1)  # anything the services print right after
    finally:
        stop_process_group(run)
    lines = log.read_text(errors="replace").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Omnigate local stack"))
    service_lines = [line for line in lines[start + 3 :] if line.strip()]
    assert service_lines and not [line for line in service_lines if line.lstrip().startswith("{")]
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: "
    up_to_ready = service_lines[: next(i for i, line in enumerate(service_lines) if ready in line) + 1]
    assert all(re.match(stamp, line) for line in up_to_ready), up_to_ready
    assert sum(ready in line for line in lines) == 1
    noise = [
        line for line in lines if "WARNING" in line or "[transformers]" in line or "Model config" in line
    ]
    assert not noise, noise


@pytest.mark.slow
def test_make_run_with_a_taken_port_exits_with_the_make_variable_to_change(tmp_path):
    ports = _run_ports()
    log = tmp_path / "run.log"
    with _taken_port() as taken:
        ports["GATEWAY_PORT"] = taken
        run = _make_run(ports, log)
        try:
            run.wait(timeout=300)
        finally:
            stop_process_group(run)
    text = log.read_text(errors="replace")
    assert run.returncode != 0, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    assert (
        f"port {taken} is in use (gateway gRPC on 127.0.0.1); choose another with make run GATEWAY_PORT=..."
        in text
    )
