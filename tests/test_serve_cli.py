"""`phikit serve` as a user runs it: a real process on a loopback port, stopped with SIGTERM."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai

from phikit.cli import main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_help_has_an_example(capsys):
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--api-key" in out and "--max-batch" in out and "phikit serve --model" in out


def test_bad_arguments_are_one_line_errors(capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert main(["serve", "--model", str(tmp_path), "--max-batch", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("phikit: error:") for line in err)
    assert "--max-batch" in err[1]


def test_port_in_use_is_a_one_line_error_before_loading(capsys, tiny_phi_checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tiny_phi_checkpoint), "--port", str(port)]) == 2
    err = capsys.readouterr()
    assert "serving" not in err.out  # refused before the model was loaded
    assert err.err.strip().startswith("phikit: error: cannot listen on 127.0.0.1:") and str(port) in err.err


def test_serve_process_answers_and_exits_cleanly_on_sigterm(tiny_phi_checkpoint):
    port = free_port()
    env = {**os.environ, "PHIKIT_API_KEY": "sk-cli"}
    proc = subprocess.Popen([sys.executable, "-m", "phikit", "serve", "--model", str(tiny_phi_checkpoint),
                             "--port", str(port), "--max-batch", "4", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(api_key="sk-cli", base_url=url + "/v1", max_retries=0)
        assert client.models.list().data[0].id == tiny_phi_checkpoint.name
        out = client.chat.completions.create(model=tiny_phi_checkpoint.name, max_tokens=4,
                                             messages=[{"role": "user", "content": "hello"}])
        assert out.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read()
    assert f"serving {tiny_phi_checkpoint.name}" in log and "shutting down" in log
