"""A vLLM server started and stopped by the pipeline (optional): `vllm serve MODEL` on this machine.

For a one-machine setup where the recognition step should bring its own server: start
``vllm serve`` with the flags that raised throughput for this workload, wait for ``/health``,
and stop it when the step ends. The GPU memory share is configurable so the layout model fits
beside it. In production, run one vLLM service that every recognition step shares instead.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_FLAGS = ("--max-num-batched-tokens", "131072", "--max-num-seqs", "512", "--no-enable-chunked-prefill")


@dataclass
class VllmSettings:
    """What to serve and how; ``flags`` replace the defaults when given."""

    model: str
    served_name: str = "glm-ocr"
    host: str = "127.0.0.1"
    port: int = 8000
    gpu_memory_utilization: float = 0.7
    flags: tuple[str, ...] = field(default=DEFAULT_FLAGS)
    executable: str = "vllm"
    startup_timeout: float = 1200.0


class ManagedVllm:
    """One ``vllm serve`` child process: ``start()`` returns its base URL once healthy, ``stop()`` ends it."""

    def __init__(self, settings: VllmSettings) -> None:
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.log = Path(tempfile.mkdtemp(prefix="vllm-")) / "vllm.log"

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}/v1"

    def command(self) -> list[str]:
        s = self.settings
        executable = shutil.which(s.executable)
        if executable is None:
            raise RuntimeError(
                f"vLLM is not installed here ({s.executable!r} is not on PATH): install it "
                f"(`pip install vllm`) or unset the recognizer's vlm_serve_model and point "
                f"OCR_ASSETS_VLM_BASE_URL at a running server"
            )
        return [executable, "serve", s.model, "--served-model-name", s.served_name, "--host", s.host,
                "--port", str(s.port), "--gpu-memory-utilization", str(s.gpu_memory_utilization), *s.flags]

    def start(self) -> str:
        """Start the server and wait until ``/health`` answers; raises with the log's tail if it dies."""
        command = self.command()
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        health = f"http://{self.settings.host}:{self.settings.port}/health"
        deadline = time.monotonic() + self.settings.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with code {self.process.returncode} while starting: "
                                   f"{self._tail()}")
            try:
                with urllib.request.urlopen(health, timeout=5) as response:
                    if response.status == 200:
                        return self.base_url
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve did not become healthy within {self.settings.startup_timeout:g} s: "
                           f"{self._tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
