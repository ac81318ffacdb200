"""The Kubernetes deployment, checked without a cluster: the instance config validates with
dagster-k8s, each step's pod (built by dagster-k8s from the ops' tags) asks for a GPU only for
layout, the manifests agree with each other, the image's command serves the code location, and the
first (CPU-only) step neither looks for CUDA nor imports torch."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from ocr_assets import config
from ocr_assets.assets import ASSETS
from ocr_assets.backends.layout import check_device
from ocr_assets.partitions import SHARDS
from ocr_assets.resources import DatasetResource, resources_from_env

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
GPU = "nvidia.com/gpu"
TORCH_FAMILY = ("torch", "torchvision", "transformers")


def _yaml(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def _manifests(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def _env_map() -> dict[str, str]:
    (config_map,) = _manifests("env.yaml")
    return config_map["data"]


def _clean_env(**settings: str) -> dict[str, str]:
    """This environment without any OCR_ASSETS_* setting, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCR_ASSETS_")}
    env.update(settings)
    return env


def _python(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True)


def _launcher_config() -> dict:
    """The run launcher's config from deploy/k8s/dagster.yaml, validated and defaulted by dagster-k8s."""
    from dagster._config import process_config
    from dagster_k8s import K8sRunLauncher

    result = process_config(K8sRunLauncher.config_type(), _yaml("dagster.yaml")["run_launcher"]["config"])
    assert result.success, result.errors
    return result.value


# --- (a) the instance config ------------------------------------------------------------------


def test_deploy_k8s_config_is_a_valid_instance_config():
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster_k8s import K8sRunLauncher

    instance, _ = dagster_instance_config(str(K8S), "dagster.yaml")
    assert (instance["run_launcher"]["module"], instance["run_launcher"]["class"]) == ("dagster_k8s", "K8sRunLauncher")
    assert instance["storage"]["postgres"]["postgres_db"]["scheme"] == "postgresql+psycopg2"
    launcher = _launcher_config()
    assert launcher["env_config_maps"] == [_manifests("env.yaml")[0]["metadata"]["name"]]
    # the same check refuses a misspelled field
    wrong = {**instance["run_launcher"]["config"], "env_config_map": ["ocr-assets-env"]}
    assert not process_config(K8sRunLauncher.config_type(), wrong).success


def test_deploy_k8s_instance_runs_queue_pools_and_monitoring(tmp_path):
    """Everything but the cluster and the database, as an instance: the run queue, pools, monitoring."""
    settings = _yaml("dagster.yaml")
    settings.pop("run_launcher")  # needs a cluster
    settings.pop("storage")  # PostgreSQL: the test instance's SQLite instead
    with dg.instance_for_test(overrides=settings, temp_dir=str(tmp_path)) as instance:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 32
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert instance.run_monitoring_enabled
        assert type(instance.compute_log_manager).__name__ == "NoOpComputeLogManager"


# --- (b) the executor and each step's pod -----------------------------------------------------

DEFINITIONS = """
import json
from ocr_assets.definitions import defs
job = defs.get_job_def("ocr_pipeline")
backfill = defs.resolve_implicit_global_asset_job_def()
try:
    from dagster_k8s import k8s_job_executor
except ImportError:
    k8s_job_executor = None
print(json.dumps({
    "executor": job.executor_def.name, "backfill_executor": backfill.executor_def.name,
    "is_k8s_job_executor": job.executor_def is k8s_job_executor and backfill.executor_def is k8s_job_executor,
    "job_tags": dict(job.tags), "op_tags": {node.name: dict(node.tags) for node in job.graph.node_defs},
}))
"""


def _definitions(tmp_path, **settings: str) -> dict:
    done = _python(DEFINITIONS, _clean_env(**settings), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _pod_spec(launcher: dict, tags: dict[str, str]):
    """The pod dagster-k8s builds for a step (or run) with these tags under this run launcher config:
    the launcher's settings, then the tags' `dagster-k8s/config` merged over them, as the executor does."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

    base = K8sContainerContext(
        env_config_maps=launcher["env_config_maps"], env_secrets=launcher["env_secrets"],
        volumes=launcher.get("volumes"), volume_mounts=launcher.get("volume_mounts"),
        resources=launcher.get("resources"), namespace=launcher["job_namespace"],
        service_account_name=launcher["service_account_name"],
    )
    context = base.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags)))
    job = construct_dagster_k8s_job(
        DagsterK8sJobConfig(job_image="ocr-assets:test", dagster_home=launcher["dagster_home"],
                            instance_config_map=launcher["instance_config_map"],
                            postgres_password_secret=launcher["postgres_password_secret"]),
        args=["dagster", "api", "execute_step"], job_name="dagster-step-test", component="step_worker",
        user_defined_k8s_config=context.run_k8s_config,
    )
    return job.spec.template.spec


def _gpus(spec) -> tuple[str | None, str | None]:
    resources = spec.containers[0].resources
    return (resources.requests or {}).get(GPU), (resources.limits or {}).get(GPU)


def test_k8s_executor_gives_only_the_layout_pod_a_gpu(tmp_path):
    found = _definitions(tmp_path, **{config.ENV_EXECUTOR: "k8s"})
    assert found["executor"] == found["backfill_executor"] == "k8s" and found["is_k8s_job_executor"]
    assert set(found["op_tags"]) == {asset.key.to_user_string() for asset in ASSETS}
    launcher = _launcher_config()
    env_map = _manifests("env.yaml")[0]["metadata"]["name"]
    for op, tags in found["op_tags"].items():
        spec = _pod_spec(launcher, tags)
        container = spec.containers[0]
        requests = container.resources.requests or {}
        assert requests.get("cpu") and requests.get("memory"), op  # every step pod is sized for scheduling
        assert [e.config_map_ref.name for e in container.env_from if e.config_map_ref] == [env_map], op
        tolerations = [t.key for t in spec.tolerations or []]
        if op == "layout":
            assert _gpus(spec) == ("1", "1")
            assert GPU in tolerations
        else:
            assert _gpus(spec) == (None, None), op
            assert GPU not in tolerations and GPU not in json.dumps(tags), op
    # the run pod: the job's own tags (none) over the launcher's settings
    assert _gpus(_pod_spec(launcher, found["job_tags"])) == (None, None)


def test_executor_is_dagsters_default_without_the_setting(tmp_path):
    found = _definitions(tmp_path)
    assert found["executor"] == found["backfill_executor"] == "multi_or_in_process_executor"
    assert not found["is_k8s_job_executor"]


def test_executor_setting_errors_name_the_variable(tmp_path):
    bad = _python(DEFINITIONS, _clean_env(**{config.ENV_EXECUTOR: "kubernetes"}), tmp_path)
    assert bad.returncode != 0 and f"{config.ENV_EXECUTOR}='kubernetes'" in bad.stderr
    # an image without dagster-k8s: the error says what to install and which setting to unset
    hide = "import sys; sys.modules['dagster_k8s'] = None\n"
    missing = _python(hide + DEFINITIONS, _clean_env(**{config.ENV_EXECUTOR: "k8s"}), tmp_path)
    assert missing.returncode != 0
    assert 'pip install ".[k8s]"' in missing.stderr and config.ENV_EXECUTOR in missing.stderr


# --- (c) the manifests agree ------------------------------------------------------------------


def test_every_manifest_parses():
    files = sorted(K8S.glob("*.yaml"))
    assert {f.name for f in files} >= {"dagster.yaml", "values.yaml", "env.yaml", "vllm.yaml"}
    for file in files:
        docs = _manifests(file.name)
        assert docs, file.name
        if file.name in ("env.yaml", "vllm.yaml"):  # Kubernetes objects, the others Dagster/Helm settings
            assert all(doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"] for doc in docs), file.name


def _vllm_servers() -> list[tuple[dict, dict]]:
    """Each vLLM Deployment with the one Service that selects its pods."""
    docs = _manifests("vllm.yaml")
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    services = [d for d in docs if d["kind"] == "Service"]
    assert deployments and len(deployments) == len(services)
    pairs = []
    for deployment in deployments:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        selecting = [s for s in services if s["spec"]["selector"].items() <= labels.items()]
        assert len(selecting) == 1, deployment["metadata"]["name"]
        pairs.append((deployment, selecting[0]))
    return pairs


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_each_vllm_server_has_one_gpu_a_health_probe_and_its_service():
    pairs = _vllm_servers()
    assert len(pairs) >= 2
    for deployment, service in pairs:
        assert deployment["spec"]["replicas"] == 1  # one server per Service: the recognizer bounds each
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["limits"][GPU] == "1"
        args = container["command"] + container["args"]
        assert args[:3] == ["vllm", "serve", "zai-org/GLM-OCR"]
        assert _flag(args, "--served-model-name") == _env_map()[config.ENV_VLM_MODEL]
        assert "--no-enable-chunked-prefill" in args and _flag(args, "--max-num-batched-tokens") == "131072"
        port = int(_flag(args, "--port"))
        probe = container["readinessProbe"]["httpGet"]
        assert probe["path"] == "/health" and probe["port"] == port
        (service_port,) = service["spec"]["ports"]
        assert service_port["targetPort"] == port
        assert service["metadata"]["name"] == deployment["metadata"]["name"]


def test_env_names_exactly_the_vllm_services_and_sizes_against_them():
    env = _env_map()
    pairs = _vllm_servers()
    urls = [f"http://{s['metadata']['name']}.{s['metadata']['namespace']}.svc:{s['spec']['ports'][0]['port']}/v1"
            for _, s in pairs]
    assert config.vlm_base_urls(env[config.ENV_VLM_BASE_URL]) == urls
    # the bound per server over all recognition steps never passes what a server runs at once
    for deployment, _ in pairs:
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert int(env[config.ENV_VLM_CONCURRENCY]) <= int(_flag(container["args"], "--max-num-seqs"))


def test_env_holds_the_settings_a_run_reads(monkeypatch):
    env = _env_map()
    known = {getattr(config, name) for name in dir(config) if name.startswith("ENV_")}
    assert set(env) - known <= {"HF_HUB_OFFLINE"}, set(env) - known
    for name in (config.ENV_EXECUTOR, config.ENV_DATASET, config.ENV_STORAGE, config.ENV_LAYOUT_MODEL,
                 config.ENV_DEVICE, config.ENV_LAYOUT_WORKER, config.ENV_VLM_BASE_URL,
                 config.ENV_VLM_CONCURRENCY, config.ENV_SENSOR_RUNS):
        assert env.get(name), name
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert config.executor() == "k8s" and config.layout_worker_mode() == "off"
    assert check_device(env[config.ENV_DEVICE]) == "cuda"
    with dg.build_resources(resources_from_env()) as resources:  # every value reads as its resource field
        assert resources.recognizer.kind_name() == "openai"
        assert resources.layout_model.backend_name() == "pp-doclayout-v3" and resources.layout_model.device == "cuda"
        assert resources.recognizer.vlm_concurrency == int(env[config.ENV_VLM_CONCURRENCY])
    # the model folder is where a volume is mounted in every run and step pod
    mounts = [m["mountPath"] for m in _launcher_config()["volume_mounts"]]
    assert any(Path(env[config.ENV_LAYOUT_MODEL]).is_relative_to(m) for m in mounts)


def test_helm_values_match_the_instance_config_env_and_image():
    values, instance = _yaml("values.yaml"), _yaml("dagster.yaml")
    (env_map,) = _manifests("env.yaml")
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    launcher, instance_launcher = values["runLauncher"]["config"]["k8sRunLauncher"], instance["run_launcher"]["config"]
    assert values["runLauncher"]["type"] == instance["run_launcher"]["class"]
    names = [env_map["metadata"]["name"]]
    assert [m["name"] for m in deployment["envConfigMaps"]] == [m["name"] for m in launcher["envConfigMaps"]] == names
    assert [s["name"] for s in deployment["envSecrets"]] == instance_launcher["env_secrets"]
    assert launcher["volumes"] == instance_launcher["volumes"]
    assert launcher["volumeMounts"] == instance_launcher["volume_mounts"]
    assert launcher["jobNamespace"] == instance_launcher["job_namespace"] == env_map["metadata"]["namespace"]
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == instance["run_coordinator"]["class"]
    assert values["dagsterDaemon"]["runMonitoring"]["enabled"] and instance["run_monitoring"]["enabled"]
    runs, pools = values["concurrency"]["runs"], values["concurrency"]["pools"]
    assert runs["maxConcurrentRuns"] == instance["concurrency"]["runs"]["max_concurrent_runs"]
    assert pools["defaultLimit"] == instance["concurrency"]["pools"]["default_limit"]
    db = instance["storage"]["postgres"]["postgres_db"]
    pg = values["postgresql"]
    assert (pg["postgresqlHost"], pg["postgresqlUsername"], pg["postgresqlDatabase"], pg["service"]["port"]) == (
        db["hostname"], db["username"], db["db_name"], db["port"])
    # the chart runs `dagster api grpc -h 0.0.0.0 -p <port> <dagsterApiGrpcArgs>`: the image's command
    chart = ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", str(deployment["port"]),
             *deployment["dagsterApiGrpcArgs"]]
    assert _grpc_options(chart) == _grpc_options(_dockerfile_command())


# --- (d) the image's command serves the code location -----------------------------------------

SHORT_FLAGS = {"-h": "--host", "-p": "--port", "-m": "--module-name", "-f": "--python-file", "-a": "--attribute"}


def _grpc_options(command: list[str]) -> dict[str, str]:
    """``dagster api grpc`` and its options by long name (a command of a different kind is refused)."""
    assert command[:3] == ["dagster", "api", "grpc"], command
    rest = command[3:]
    assert len(rest) % 2 == 0, command
    return {SHORT_FLAGS.get(flag, flag): value for flag, value in zip(rest[::2], rest[1::2])}


def _dockerfile_instructions() -> dict[str, list[str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word.upper() in ("CMD", "ENTRYPOINT", "FROM", "USER", "RUN"):
            found.setdefault(word.upper(), []).append(rest.strip())
    return found


def _dockerfile_command() -> list[str]:
    found = _dockerfile_instructions()
    # the chart and the run launcher pass each pod's command as args: an ENTRYPOINT would prefix them
    assert "ENTRYPOINT" not in found
    (cmd,) = found["CMD"]
    command = json.loads(cmd)  # exec form: a JSON list, no shell in between
    assert isinstance(command, list) and all(isinstance(part, str) for part in command)
    return command


def test_dockerfile_installs_the_project_for_kubernetes_as_a_user():
    found = _dockerfile_instructions()
    assert any(re.search(r'(^|&& )pip install "\.\[k8s\]"$', run) for run in found["RUN"]), found["RUN"]
    (user,) = found["USER"]
    assert user not in ("root", "0")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _health_check(port: int) -> subprocess.CompletedProcess:
    dagster = str(Path(sys.executable).parent / "dagster")  # this venv's, as the image's is on its PATH
    return subprocess.run([dagster, "api", "grpc-health-check", "--port", str(port)],
                          capture_output=True, text=True, env=_clean_env())


def _answers(client) -> bool:
    try:
        client.ping("ready?")
    except Exception:  # not listening yet (or any more)
        return False
    return True


def test_image_command_serves_the_code_location(tmp_path):
    from dagster._core.remote_origin import GrpcServerCodeLocationOrigin, RemoteRepositoryOrigin
    from dagster._grpc.client import DagsterGrpcClient
    from dagster._serdes import deserialize_value

    command = _dockerfile_command()
    port = _free_port()
    command[command.index("--port") + 1] = str(port)
    bin_dir = Path(sys.executable).parent  # the image's PATH has dagster: this venv's does too
    env = _clean_env(**_env_map(), DAGSTER_HOME=str(tmp_path), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    client = DagsterGrpcClient(port=port, host="localhost")
    try:
        # wait until it answers (a server that exits stops the wait), then check it as the chart's probe does
        for _ in range(600):
            if server.poll() is not None or _answers(client):
                break
            try:
                server.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        healthy = _health_check(port)
        assert healthy.returncode == 0, (tmp_path / "server.log").read_text()[-3000:]
        listed = deserialize_value(client.list_repositories())
        (symbol,) = listed.repository_symbols
        assert listed.repository_code_pointer_dict[symbol.repository_name].module == "ocr_assets.definitions"
        location = GrpcServerCodeLocationOrigin(host="localhost", port=port, location_name="ocr_assets")
        snap = deserialize_value(client.external_repository(RemoteRepositoryOrigin(location, symbol.repository_name)))
        assert {node.asset_key.to_user_string() for node in snap.asset_nodes} == {
            asset.key.to_user_string() for asset in ASSETS}
        ops = {op.name: op.tags for op in snap.get_job_data("ocr_pipeline").job.node_defs_snapshot.op_def_snaps}
        assert [name for name, tags in ops.items() if GPU in tags.get("dagster-k8s/config", "")] == ["layout"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    assert not _answers(client)  # the check can fail: nothing serves the port now


# --- (e) the first, CPU-only step -------------------------------------------------------------


@pytest.fixture
def layout_model_folder(tmp_path) -> str:
    """A PP-DocLayoutV3 folder as preflight sees it (a config.json; the model is loaded only by layout)."""
    folder = tmp_path / "pp-doclayout-v3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "pp_doclayout_v3"}))
    return str(folder)


def _k8s_settings(dataset: str, storage: str, model: str, device: str = "cuda") -> dict[str, str]:
    """env.yaml's settings, with local data, model, no VLM server and no GPU visible."""
    env = {k: v for k, v in _env_map().items() if k != config.ENV_VLM_BASE_URL}
    env.update({config.ENV_DATASET: dataset, config.ENV_STORAGE: storage, config.ENV_LAYOUT_MODEL: model,
                config.ENV_DEVICE: device, config.ENV_RECOGNIZER: "local", "CUDA_VISIBLE_DEVICES": ""})
    return env


def _materialize_pages(settings: dict[str, str], monkeypatch) -> dg.ExecuteInProcessResult:
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    with dg.instance_for_test() as instance:
        key = DatasetResource(path=settings[config.ENV_DATASET]).shards()[0].key
        instance.add_dynamic_partitions(SHARDS, [key])
        return dg.materialize(ASSETS[:1], partition_key=key, instance=instance, resources=resources_from_env(),
                              raise_on_error=False)


def test_pages_step_with_device_cuda_runs_without_cuda(small_dataset, layout_model_folder, tmp_path, monkeypatch):
    settings = _k8s_settings(small_dataset, str(tmp_path / "out"), layout_model_folder)
    result = _materialize_pages(settings, monkeypatch)
    assert result.success
    assert (tmp_path / "out" / "pages").is_dir()
    # the step's preflight still checks the setting's spelling, and says which setting
    bad = _materialize_pages({**settings, config.ENV_DEVICE: "gpu0"}, monkeypatch)
    (failure,) = [event.step_failure_data.error for event in bad.all_events if event.is_step_failure]
    assert f"{config.ENV_DEVICE}='gpu0' is not a device" in failure.to_string()


NO_TORCH = """
import json, sys
import dagster as dg
import ocr_assets.definitions
from ocr_assets.assets import ASSETS
from ocr_assets.partitions import SHARDS
from ocr_assets.resources import DatasetResource, LayoutResource, resources_from_env
from ocr_assets import config
LayoutResource(backend="pp-doclayout-v3", model=config.env(config.ENV_LAYOUT_MODEL), device="cuda").preflight()
with dg.instance_for_test() as instance:
    key = DatasetResource(path=config.env(config.ENV_DATASET)).shards()[0].key
    instance.add_dynamic_partitions(SHARDS, [key])
    ok = dg.materialize(ASSETS[:1], partition_key=key, instance=instance, resources=resources_from_env()).success
print(json.dumps({"ok": ok, "imported": sorted(m for m in sys.modules if m.split(".")[0] in %r)}))
""" % (TORCH_FAMILY,)
IMPORTED = NO_TORCH.splitlines()[-1].replace('"ok": ok, ', "")  # the same look at sys.modules, alone


def test_the_pages_pod_never_imports_torch(small_dataset, layout_model_folder, tmp_path):
    settings = _k8s_settings(small_dataset, str(tmp_path / "out"), layout_model_folder)
    done = _python(NO_TORCH, _clean_env(**settings, DAGSTER_HOME=str(tmp_path)), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"ok": True, "imported": []}
    # and the check sees an import when there is one
    shown = _python("import json, sys, torch\n" + IMPORTED, _clean_env(), tmp_path)
    assert "torch" in json.loads(shown.stdout.strip().splitlines()[-1])["imported"]

