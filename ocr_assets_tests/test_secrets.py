"""The VLM API key comes from the environment only and appears in no log, metadata, run record or output."""

from __future__ import annotations

import dagster as dg

from ocr_assets import config
from ocr_assets.assets import ASSETS
from ocr_assets.partitions import SHARDS
from ocr_assets.resources import DatasetResource, LayoutResource, RecognizerResource, StorageResource
from ocr_assets.serve import OcrServer

SECRET = "sk-test-4f1c9a7e0b2d48c6"


class KeyCheckingServer(OcrServer):
    """Answers only requests that carry the key (so the key really travels), and remembers that they did."""

    def __init__(self):
        self.seen_keys: set[str] = set()
        super().__init__()

    async def _chat(self, request):
        self.seen_keys.add(request.headers.get("Authorization", ""))
        return await super()._chat(request)


def test_the_api_key_is_used_and_never_recorded(small_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv(config.ENV_VLM_API_KEY, SECRET)
    server = KeyCheckingServer().start()
    (tmp_path / "home").mkdir()
    try:
        resources = {
            "dataset": DatasetResource(path=small_dataset), "storage": StorageResource(root=str(tmp_path / "out")),
            "layout_model": LayoutResource(),
            "recognizer": RecognizerResource(vlm_base_url=server.base_url, vlm_api_key=dg.EnvVar(config.ENV_VLM_API_KEY)),
        }
        with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
            key = DatasetResource(path=small_dataset).shards()[0].key
            instance.add_dynamic_partitions(SHARDS, [key])
            result = dg.materialize(ASSETS, partition_key=key, instance=instance, resources=resources)
            assert result.success
            run = instance.get_run_by_id(result.run_id)
            records = instance.all_logs(result.run_id)
            recorded = repr(run) + "".join(repr(r) for r in records)
    finally:
        server.shutdown()
        server.server_close()
    assert server.seen_keys == {f"Bearer {SECRET}"}
    assert SECRET not in recorded
    for file in tmp_path.rglob("*"):  # Parquet outputs, the cache, previews, compute logs, the instance's DB
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file


def test_tls_certificates_are_verified_unless_turned_off(tmp_path):
    """A server with a self-signed certificate is refused by default, and read with vlm_verify_tls off."""
    import ssl
    import subprocess

    import pytest

    from ocr_assets.backends.recognition.base import Crop
    from ocr_assets.backends.recognition.openai_vlm import OpenAIRecognizer

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                           "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("openssl could not make a test certificate")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = OcrServer(answer=lambda image, prompt, max_tokens: "over tls", ssl_context=context).start()
    try:
        assert server.base_url.startswith("https://")
        with pytest.raises(ConnectionError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            OpenAIRecognizer(server.base_url)
        unverified = OpenAIRecognizer(server.base_url, verify_tls=False)
        (result,) = unverified.recognize([Crop("text", b"\xff\xd8\xff-any-bytes", 28, 28)])
        assert (result.status, result.text) == ("ok", "over tls")
    finally:
        server.shutdown()
        server.server_close()
