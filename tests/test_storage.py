"""Stores, checkpoints and outputs on object storage (docs/storage.md), against a real
S3-compatible server (moto's, over HTTP on localhost) behind a counting, fault-injecting proxy:
nothing is patched in-process, the core talks HTTP to it as to S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load, save

import phema
from phema import files, meta

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from storage_server import Proxy, certificate_authority, free_port  # noqa: E402

from conftest import make_store  # noqa: E402

ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_REGION": "us-east-1",
    "AWS_ALLOW_HTTP": "true",
    # Failures are meant to end quickly here: few retries, a short budget.
    "PHEMA_STORAGE_RETRIES": "3",
    "PHEMA_STORAGE_RETRY_TIMEOUT": "20",
}


class S3:
    def __init__(self) -> None:
        port = free_port()
        self.moto = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.moto.start()
        self.proxy = Proxy(port)
        # Set-up and inspection go to the server directly, not through the proxy.
        self.client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        found = self.client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return sorted(o["Key"] for o in found)

    def get(self, bucket: str, key: str) -> bytes:
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=data)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    server = S3()
    yield server
    server.proxy.stop()
    server.moto.stop()


@pytest.fixture
def bucket(s3: S3, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"b{uuid.uuid4().hex[:12]}"
    s3.client.create_bucket(Bucket=name)
    for k, v in (ENV | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3.proxy.port}"}).items():
        monkeypatch.setenv(k, v)
    s3.proxy.reset()
    return name


def _train(stores: list[str], steps: int = 40) -> None:
    """One tiny run tracked into every store at once (the same updates)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
    trackers = [
        phema.PostHocEMA(model, store=s, sigma_rels=(0.05, 0.10), snapshot_every=10) for s in stores
    ]
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(steps):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for t in trackers:
            t.update()
    for t in trackers:
        t.close()


def _tensors(s3: S3, url: str) -> dict[str, np.ndarray]:
    bucket, key = url.removeprefix("s3://").split("/", 1)
    return load(s3.get(bucket, key))


def _local(path: str) -> dict[str, np.ndarray]:
    return load(Path(path).read_bytes())


def _metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})


@pytest.fixture
def run(s3: S3, bucket: str, tmp_path: Path) -> tuple[str, str]:
    """The same run tracked into the bucket and into a local directory."""
    url, local = f"s3://{bucket}/run", str(tmp_path / "run")
    _train([url, local])
    return url, local


def test_a_run_tracked_into_a_bucket_reconstructs_and_averages_as_on_local_disk(
    s3: S3, bucket: str, run: tuple[str, str], tmp_path: Path
) -> None:
    url, local = run
    names = sorted(os.listdir(local))
    keys = s3.keys(bucket, "run/")
    assert [k.removeprefix("run/") for k in keys if k.endswith(".safetensors")] == names
    # The run's claim: the one object only its run could create.
    assert f"run/{meta.RUN_CLAIM}" in keys

    remote = phema.reconstruct(url, sigma_rels=[0.06, 0.09], out=f"s3://{bucket}/out")
    here = phema.reconstruct(local, sigma_rels=[0.06, 0.09], out=str(tmp_path / "out"))
    assert [p.rsplit("/", 1)[1] for p in remote] == [os.path.basename(p) for p in here]
    for r, h in zip(remote, here):
        a, b = _tensors(s3, r), _local(h)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # Outputs record the store's URL as given.
    bucket_, key = remote[0].removeprefix("s3://").split("/", 1)
    assert _metadata(s3.get(bucket_, key))["phema.store"] == url

    # average: snapshots as checkpoints, from the bucket into the bucket.
    picked = names[-3:]
    avg_remote = phema.average([f"{url}/{n}" for n in picked], out=f"s3://{bucket}/avg")
    avg_here = phema.average([os.path.join(local, n) for n in picked], out=str(tmp_path / "avg"))
    a, b = _tensors(s3, avg_remote[0]), _local(avg_here[0])
    assert all(np.array_equal(a[k], b[k]) for k in a)

    # The command line takes the same URLs.
    env = os.environ | {"PYTHONPATH": str(Path(phema.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "phema", "reconstruct", url, "--sigma-rel", "0.07",
         "--out", f"s3://{bucket}/cli"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    cli = [k for k in s3.keys(bucket, "cli/")]
    assert len(cli) == 1 and "0.07" in cli[0]
    again = phema.reconstruct(local, sigma_rels=0.07, out=str(tmp_path / "cli"))
    a, b = _tensors(s3, f"s3://{bucket}/{cli[0]}"), _local(again[0])
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_sweep_reads_a_store_in_a_bucket(
    bucket: str, run: tuple[str, str], tmp_path: Path
) -> None:
    url, local = run
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"out": float(m(x).pow(2).mean())}

    remote = phema.sweep(url, model, evaluate, sigma_rels=[0.05, 0.08], progress=False)
    here = phema.sweep(local, model, evaluate, sigma_rels=[0.05, 0.08], progress=False)
    assert [r.metrics for r in remote.rows] == [r.metrics for r in here.rows]


def _checkpoint(values: dict[str, np.ndarray], step: int) -> bytes:
    return save(values, metadata={"step": str(step)})


def test_checkpoints_in_a_bucket_through_every_entry_point(
    s3: S3, bucket: str, tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)
    local = tmp_path / "ck"
    for step in (100, 200, 300, 400):
        data = _checkpoint({"w": rng.standard_normal((8, 8), np.float32)}, step)
        # Directories as a Trainer writes them, and beside them what is not a checkpoint.
        s3.put(bucket, f"ck/checkpoint-{step}/model.safetensors", data)
        (local / f"checkpoint-{step}").mkdir(parents=True)
        (local / f"checkpoint-{step}" / "model.safetensors").write_bytes(data)
    s3.put(bucket, "ck/logs/events.txt", b"not weights")
    (local / "logs").mkdir()
    (local / "logs" / "events.txt").write_bytes(b"not weights")
    url = f"s3://{bucket}/ck"
    remote, here = phema.open_checkpoints(url), phema.open_checkpoints(str(local))
    assert [s.t for s in remote.snapshots] == [s.t for s in here.snapshots] == [100, 200, 300, 400]
    a = phema.reconstruct_state_dict(remote, last=2)
    b = phema.reconstruct_state_dict(here, last=2)
    assert all(torch.equal(a[k], b[k]) for k in a)

    env = os.environ | {"PYTHONPATH": str(Path(phema.__file__).parents[1])}
    cli = [sys.executable, "-m", "phema"]
    shown = subprocess.run(
        [*cli, "inspect", "--checkpoints", url], capture_output=True, text=True, env=env
    )
    assert shown.returncode == 0, shown.stderr
    assert f"store {url}: 4 snapshots" in shown.stdout
    assert f"ignored {url}/logs: no .safetensors file" in shown.stdout
    done = subprocess.run(
        [*cli, "average", f"{url}/checkpoint-300", f"{url}/checkpoint-400", "--out",
         f"s3://{bucket}/avg"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [key] = s3.keys(bucket, "avg/")
    got = load(s3.get(bucket, key))["w"]
    w3 = load((local / "checkpoint-300" / "model.safetensors").read_bytes())["w"]
    w4 = load((local / "checkpoint-400" / "model.safetensors").read_bytes())["w"]
    np.testing.assert_allclose(got, (w3.astype(np.float64) + w4) / 2, rtol=1e-6)


def test_https_with_the_server_certificate_verified(s3: S3, bucket: str, tmp_path: Path) -> None:
    """S3 and GCS are HTTPS: a store read over TLS from a server whose certificate a test CA
    signed, trusted through SSL_CERT_FILE (as the system's roots are), and refused under another
    CA: the certificate is checked, not only the connection encrypted, and the error says so."""
    local = tmp_path / "store"
    make_store(local, [100, 200], {"w": (4, 4)})
    for name in os.listdir(local):
        s3.put(bucket, f"store/{name}", (local / name).read_bytes())
    ca, context = certificate_authority(tmp_path, "trusted")
    other, _ = certificate_authority(tmp_path, "other")
    tls = Proxy(s3.proxy.upstream_port, context)
    try:
        url = f"s3://{bucket}/store"
        env = (
            os.environ
            | ENV
            | {
                "PYTHONPATH": str(Path(phema.__file__).parents[1]),
                "AWS_ENDPOINT_URL": f"https://127.0.0.1:{tls.port}",
                "AWS_ALLOW_HTTP": "false",
                "PHEMA_STORAGE_RETRIES": "0",
            }
        )
        cmd = [sys.executable, "-m", "phema", "inspect", url]
        shown = subprocess.run(
            cmd, capture_output=True, text=True, env=env | {"SSL_CERT_FILE": str(ca)}, timeout=120
        )
        assert shown.returncode == 0, shown.stderr
        assert f"store {url}: 4 snapshots" in shown.stdout
        assert tls.traffic.requests[("GET", f"/{bucket}")] >= 1  # the listing went through TLS
        tls.reset()
        refused = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=env | {"SSL_CERT_FILE": str(other)},
            timeout=120,
        )
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert url in refused.stderr and "invalid peer certificate" in refused.stderr
        assert not tls.traffic.requests  # no request got past the handshake
    finally:
        tls.stop()


def test_only_the_bytes_of_what_is_used_are_fetched(s3: S3, bucket: str) -> None:
    rng = np.random.default_rng(0)
    ckpts = {
        step: {"a": rng.standard_normal((64, 64), np.float32), "b": rng.standard_normal(300, np.float32)}
        for step in (100, 200, 300)
    }  # fmt: skip
    sizes, headers = {}, {}
    for step, values in ckpts.items():
        data = _checkpoint(values, step)
        s3.put(bucket, f"ck/step-{step}.safetensors", data)
        sizes[step] = len(data)
        headers[step] = 8 + int.from_bytes(data[:8], "little")
    s3.proxy.reset()
    urls = [f"s3://{bucket}/ck/step-{s}.safetensors" for s in ckpts]
    out = phema.average(urls, weights=[0.5, 0.5, 0.0], out=f"s3://{bucket}/avg")
    got = _tensors(s3, out[0])
    for k in ("a", "b"):
        expected = (0.5 * ckpts[100][k].astype(np.float64) + 0.5 * ckpts[200][k]).astype(np.float32)
        np.testing.assert_allclose(got[k], expected, rtol=1e-6, atol=1e-7)
    fetched = {s: s3.proxy.traffic.fetched(f"/{bucket}/ck/step-{s}.safetensors") for s in ckpts}
    # A checkpoint of weight zero: its header, never its data.
    assert fetched[300] <= headers[300]
    # The others: their data once, their header twice (listing, then opening), nothing more.
    for s in (100, 200):
        data = sizes[s] - headers[s]
        assert data <= fetched[s] <= data + 2 * headers[s], (s, fetched[s], sizes[s])


def test_a_checked_store_is_fetched_once_in_one_piece_per_object(
    s3: S3, bucket: str, tmp_path: Path
) -> None:
    # Snapshots of 2 MiB, checksums recorded: ~20 work items per object for 16 readers, so the
    # check of each checksum, which reads in file order, often catches up on pieces other
    # readers fetched but have not counted yet. Each object must still be fetched as its
    # header (two reads, when listed) and one piece (its data and, for the checksum, its JSON).
    local = tmp_path / "store"
    local.mkdir()
    rng = np.random.default_rng(1)
    base = {n: rng.standard_normal((1024, 512)).astype(np.float32) for n in ("a", "b")}
    for t in (1000, 2000):
        for sigma_rel in (0.05, 0.10):
            gamma = phema._core.sigma_rel_to_gamma(sigma_rel)
            m = meta.header("power") | meta.snapshot_metadata(t, gamma, sigma_rel)
            name = f"{t:012d}-{sigma_rel:.3f}.safetensors"
            values = {n: v + t * sigma_rel / 1000 for n, v in base.items()}
            phema.store.write_snapshot(local / name, values, "float16", m)
            data = (local / name).read_bytes()
            assert "phema.checksum" in _metadata(data)
            s3.put(bucket, f"st/{name}", data)
    s3.proxy.reset()
    [remote] = phema.reconstruct(f"s3://{bucket}/st", sigma_rels=0.08, out=str(tmp_path / "r"))
    [here] = phema.reconstruct(str(local), sigma_rels=0.08, out=str(tmp_path / "h"))
    a, b = _local(remote), _local(here)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for name in sorted(os.listdir(local)):
        data = (local / name).read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        key = f"/{bucket}/st/{name}"
        assert s3.proxy.traffic.requests[("GET", key)] == 3, name
        assert s3.proxy.traffic.fetched(key) <= len(data) + header, name


def test_a_burst_of_throttling_is_retried_and_gives_the_same_result(
    s3: S3, bucket: str, run: tuple[str, str], tmp_path: Path
) -> None:
    url, local = run
    store = phema.open_store(url)
    s3.proxy.fail_next = 3
    remote = phema.reconstruct(store, sigma_rels=0.08, out=str(tmp_path / "r"))
    assert s3.proxy.failed == 3
    here = phema.reconstruct(local, sigma_rels=0.08, out=str(tmp_path / "h"))
    a, b = _local(remote[0]), _local(here[0])
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_server_that_stops_mid_run_gives_one_error_naming_the_object_and_no_output(
    s3: S3, bucket: str, run: tuple[str, str]
) -> None:
    url, _ = run
    store = phema.open_store(url)
    s3.proxy.down_after = 3  # a few data reads get through, then nothing answers
    with pytest.raises(phema.StorageError) as e:
        phema.reconstruct(store, sigma_rels=0.08, out=f"s3://{bucket}/out")
    assert f"{url}/" in str(e.value) and ".safetensors" in str(e.value)
    s3.proxy.reset()
    assert s3.keys(bucket, "out") == []


def test_a_snapshot_replaced_after_listing_is_refused(
    s3: S3, bucket: str, run: tuple[str, str]
) -> None:
    url, _ = run
    store = phema.open_store(url)
    key = store.snapshots[-1].path.removeprefix(f"s3://{bucket}/")
    data = bytearray(s3.get(bucket, key))
    data[-1] ^= 0x40  # same size, same header, other data
    s3.put(bucket, key, bytes(data))
    with pytest.raises(phema.StorageError, match="changed since it was listed") as e:
        phema.reconstruct(store, sigma_rels=0.08, out=f"s3://{bucket}/out")
    assert key in str(e.value)
    assert s3.keys(bucket, "out") == []


def test_outputs_never_replace_an_object(s3: S3, bucket: str, run: tuple[str, str]) -> None:
    url, _ = run
    [first] = phema.reconstruct(url, sigma_rels=0.08, out=f"s3://{bucket}/out")
    before = s3.get(bucket, first.removeprefix(f"s3://{bucket}/"))
    s3.proxy.reset()
    with pytest.raises(FileExistsError, match="only writes new objects"):
        phema.reconstruct(url, sigma_rels=0.08, out=f"s3://{bucket}/out")
    # Refused before any snapshot data was read (headers only); the first output is untouched.
    keys = [k for k in s3.keys(bucket, "run/") if k.endswith(".safetensors")]
    heads = {k: 8 + int.from_bytes(s3.get(bucket, k)[:8], "little") for k in keys}
    for k in keys:
        assert s3.proxy.traffic.fetched(f"/{bucket}/{k}") <= heads[k]
    assert s3.get(bucket, first.removeprefix(f"s3://{bucket}/")) == before


def test_two_trackers_claiming_one_store_one_wins(bucket: str) -> None:
    url = f"s3://{bucket}/shared"
    model = torch.nn.Linear(4, 4)
    trackers = [phema.PostHocEMA(model, store=url, sigma_rels=(0.1,)) for _ in range(2)]
    for t in trackers:
        t.update()
    gate = threading.Barrier(2)
    outcomes: list[Any] = [None, None]

    def snap(i: int) -> None:
        gate.wait()
        try:
            trackers[i].snapshot()
            outcomes[i] = "ok"
        except phema.PhemaError as e:
            outcomes[i] = e

    threads = [threading.Thread(target=snap, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(map(str, outcomes)).count("ok") == 1, outcomes
    [error] = [o for o in outcomes if o != "ok"]
    assert "claimed by run" in str(error) and url in str(error)
    winner = trackers[outcomes.index("ok")]
    winner.close()
    store = phema.open_store(url)
    assert {s.metadata["phema.run_id"] for s in store.snapshots} == {winner.run_id}


def test_an_upload_killed_midway_leaves_nothing_a_listing_accepts(
    s3: S3, bucket: str, run: tuple[str, str]
) -> None:
    url, _ = run
    env = os.environ | {
        "PYTHONPATH": str(Path(phema.__file__).parents[1]),
        "PHEMA_FAILPOINT": "upload:2",
    }
    code = (
        "import phema, sys; phema.reconstruct(sys.argv[1], sigma_rels=0.08, "
        "out=sys.argv[2], shard_size=150)"
    )
    out = f"s3://{bucket}/killed"
    done = subprocess.run(
        [sys.executable, "-c", code, url, out], capture_output=True, env=env, timeout=120
    )
    assert done.returncode != 0
    left = s3.keys(bucket, "killed/")
    assert left, "the first shard was uploaded before the kill"
    assert not any(k.endswith(".index.json") for k in left)
    [label] = {k.split("/")[1] for k in left}
    with pytest.raises(phema.PhemaError, match="without its index"):
        files.checkpoint_files(f"{out}/{label}")


def test_locations_phema_does_not_read_are_one_clear_error(bucket: str) -> None:
    for url in ("http://example.com/store", "az://container/store"):
        with pytest.raises(phema.InvalidValueError, match=url.split(":")[0]):
            phema.open_store(url)
    with pytest.raises(phema.StorageError, match="s3://no-such-bucket-here/store"):
        phema.open_store("s3://no-such-bucket-here/store")
    for url in ("s3:///store", "gs://"):
        with pytest.raises(phema.InvalidValueError, match=f"^{url}: no bucket named"):
            phema.open_store(url)
    env = os.environ | {"PYTHONPATH": str(Path(phema.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "phema", "inspect", f"s3://{bucket}/nothing-here"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and f"s3://{bucket}/nothing-here" in done.stderr


def test_missing_credentials_are_named_as_such(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off the cloud, without keys in the environment, the error says what to set rather than
    which metadata endpoint refused (a closed local port stands for the unreachable endpoint)."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("PHEMA_STORAGE_RETRIES", "0")
    with pytest.raises(
        phema.StorageError, match=f"^s3://{bucket}: no credentials: set AWS_ACCESS_KEY_ID"
    ):
        phema.open_store(f"s3://{bucket}/store")
