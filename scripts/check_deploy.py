"""Structural checks of deploy/ that need no cluster and no Docker daemon (run by scripts/check-deploy).

    python3 scripts/check_deploy.py [RENDERED.yaml]

Without an argument the Kubernetes objects are read from the files that
deploy/kubernetes/kustomization.yaml lists; with one, from `kubectl kustomize` output.
Checks:
  * the manifests: namespace-free; every Deployment/StatefulSet container has liveness and
    readiness probes on /healthz and /readyz of its http port (8080), resources, non-root,
    the Prometheus annotations that deploy/prometheus/prometheus-kubernetes.yml relies on;
    the trainer StatefulSet has replicas 1, a startup probe, a grace period >= 60 s, a
    headless Service, and a volumeClaimTemplate mounted at the checkpoint directory; the
    serving Deployment, its Service, PodDisruptionBudget and HPA select each other;
  * the ConfigMap's towerstream.toml uses only keys of deploy/towerstream.toml (not
    replication.publish, which `train` sets) and agrees with the TOWERSTREAM_* environment of the pods, whose names
    must be keys of deploy/towerstream.toml too;
  * deploy/Dockerfile: the runtime stage copies torch/lib to the very path the builder's venv
    has it at (the binary's rpath), the builder's Python matches the Debian release, the
    torch version is scripts/setup's, non-root user, EXPOSE 8080, the entrypoint and CMD;
  * .dockerignore excludes the local build and data directories.
Exits 1 listing every failure.
"""

import pathlib
import re
import shlex
import sys
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
PORT = 8080
CONFIG_KEY = "towerstream.toml"
# Debian release of the rust / debian base images -> its python3 (the venv's lib/pythonX.Y).
DEBIAN_PYTHON = {"bookworm": "3.11", "trixie": "3.13"}

errors = []


def fail(msg):
    errors.append(msg)


def load_docs(rendered):
    if rendered:
        text = pathlib.Path(rendered).read_text()
        return [d for d in yaml.safe_load_all(text) if d]
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kust.get("resources", [])
    present = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    for name in sorted(set(present) - set(listed)):
        fail(f"deploy/kubernetes/{name} is not listed in kustomization.yaml resources")
    docs = []
    for name in listed:
        path = K8S / name
        if not path.exists():
            fail(f"kustomization.yaml lists {name}, which does not exist")
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def name_of(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ---- configuration keys ----------------------------------------------------------------------

REFERENCE = tomllib.loads((DEPLOY / "towerstream.toml").read_text())
# Tables whose keys are free-form (librdkafka properties).
FREE_TABLES = {("kafka", "client")}


def key_exists(path):
    node = REFERENCE
    for i, part in enumerate(path):
        if tuple(path[:i]) in FREE_TABLES:
            return True
        if not isinstance(node, dict) or part not in node:
            return tuple(path[: i + 1]) in FREE_TABLES
        node = node[part]
    return True


def leaf_paths(table, prefix=()):
    for k, v in table.items():
        if isinstance(v, dict) and prefix + (k,) not in FREE_TABLES:
            yield from leaf_paths(v, prefix + (k,))
        else:
            yield prefix + (k,)


def env_key(name):
    """TOWERSTREAM_CHECKPOINT__DIR -> ("checkpoint", "dir"); None for other variables."""
    if not name.startswith("TOWERSTREAM_"):
        return None
    return tuple(name[len("TOWERSTREAM_"):].lower().split("__"))


def lookup(table, path):
    for p in path:
        if not isinstance(table, dict) or p not in table:
            return None
        table = table[p]
    return table


def check_configmaps(docs):
    configs = {}
    for d in docs:
        if d.get("kind") != "ConfigMap":
            continue
        text = (d.get("data") or {}).get(CONFIG_KEY)
        if text is None:
            continue
        try:
            cfg = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            fail(f"{name_of(d)}: {CONFIG_KEY} does not parse: {e}")
            continue
        if lookup(cfg, ("replication", "publish")):
            fail(f"{name_of(d)}: replication.publish belongs to `train`, not the shared ConfigMap")
        for path in leaf_paths(cfg):
            if not key_exists(path):
                fail(f"{name_of(d)}: key {'.'.join(path)} is not in deploy/towerstream.toml")
        listen = lookup(cfg, ("serve", "listen"))
        if listen is not None and (listen.startswith("127.") or not listen.endswith(f":{PORT}")):
            fail(f"{name_of(d)}: serve.listen {listen!r} must be reachable on port {PORT}")
        configs[d["metadata"]["name"]] = cfg
    if not configs:
        fail(f"no ConfigMap with a {CONFIG_KEY} key")
    return configs


# ---- workloads ------------------------------------------------------------------------------


def container_ports(c):
    return {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}


def probe_port(c, probe):
    port = probe.get("httpGet", {}).get("port")
    return container_ports(c).get(port) if isinstance(port, str) else port


def check_probe(where, c, kind, path):
    probe = c.get(kind)
    if not probe:
        fail(f"{where}: no {kind}")
        return
    get = probe.get("httpGet") or {}
    if get.get("path") != path:
        fail(f"{where}: {kind} must be httpGet {path}, is {get or probe}")
    if probe_port(c, probe) != PORT:
        fail(f"{where}: {kind} port {get.get('port')!r} is not container port {PORT}")


def config_mount(where, spec, c, configs):
    """The --config path (or TOWERSTREAM_CONFIG) of the container, checked to lie on a mounted
    ConfigMap key."""
    args = list(c.get("command", [])) + list(c.get("args", []))
    path = next((e.get("value") for e in c.get("env", []) if e["name"] == "TOWERSTREAM_CONFIG"), None)
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    if path is None:
        fail(f"{where}: no --config argument (or TOWERSTREAM_CONFIG)")
        return None, args
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        v = volumes.get(m["name"], {})
        cm = (v.get("configMap") or {}).get("name")
        if cm and path == f"{m['mountPath'].rstrip('/')}/{CONFIG_KEY}":
            if cm not in configs:
                fail(f"{where}: mounts ConfigMap {cm}, which has no {CONFIG_KEY}")
            return configs.get(cm), args
    fail(f"{where}: --config {path} is not a mounted ConfigMap's {CONFIG_KEY}")
    return None, args


def check_env(where, c, cfg):
    env = {}
    for e in c.get("env", []):
        key = env_key(e["name"])
        if key is None:
            continue
        if e["name"] == "TOWERSTREAM_CONFIG":  # the file's path (the same as --config)
            continue
        if not key_exists(key):
            fail(f"{where}: {e['name']} names no key of deploy/towerstream.toml")
            continue
        env[key] = e.get("value")
        in_file = lookup(cfg, key) if cfg else None
        if in_file is not None and str(in_file) != str(e.get("value")):
            fail(f"{where}: {e['name']}={e.get('value')!r} disagrees with the ConfigMap's "
                 f"{'.'.join(key)} = {in_file!r}")
    return env


def effective(key, env, cfg):
    if key in env:
        return env[key]
    value = lookup(cfg, key) if cfg else None
    return value if value is not None else lookup(REFERENCE, key)


def check_workload(d, configs):
    where = name_of(d)
    spec = d["spec"]["template"]["spec"]
    meta = d["spec"]["template"].get("metadata", {})
    labels = meta.get("labels", {})
    if not selects(d["spec"].get("selector", {}).get("matchLabels"), labels):
        fail(f"{where}: selector does not match the pod template's labels")
    ann = meta.get("annotations", {})
    want = {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT),
            "prometheus.io/path": "/metrics"}
    for k, v in want.items():
        if ann.get(k) != v:
            fail(f"{where}: pod annotation {k} must be {v!r}, is {ann.get(k)!r}")
    if labels.get("app.kubernetes.io/name") != "towerstream":
        fail(f"{where}: pods need the label app.kubernetes.io/name: towerstream (Prometheus keeps those)")
    psc = spec.get("securityContext", {})
    results = []
    for c in spec.get("containers", []):
        cw = f"{where} container {c['name']}"
        check_probe(cw, c, "livenessProbe", "/healthz")
        check_probe(cw, c, "readinessProbe", "/readyz")
        if container_ports(c).get("http") != PORT:
            fail(f"{cw}: needs a container port named http = {PORT} (Prometheus, probes, Services)")
        csc = c.get("securityContext", {})
        if not (csc.get("runAsNonRoot", psc.get("runAsNonRoot"))):
            fail(f"{cw}: runAsNonRoot is not set")
        if csc.get("runAsUser", psc.get("runAsUser")) in (0, None):
            fail(f"{cw}: runAsUser must be a non-zero uid")
        if csc.get("allowPrivilegeEscalation") is not False:
            fail(f"{cw}: allowPrivilegeEscalation must be false")
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(part, {}):
                    fail(f"{cw}: resources.{part}.{r} is not set")
        cfg, args = config_mount(cw, spec, c, configs)
        env = check_env(cw, c, cfg)
        listen = effective(("serve", "listen"), env, cfg)
        if not str(listen).endswith(f":{PORT}") or str(listen).startswith("127."):
            fail(f"{cw}: effective serve.listen {listen!r} is not reachable on port {PORT}")
        results.append((c, args, env, cfg, csc, psc))
    return results


def check_trainer(d, configs, services):
    where = name_of(d)
    if d["spec"].get("replicas") != 1:
        fail(f"{where}: the trainer must have replicas: 1, has {d['spec'].get('replicas')!r}")
    spec = d["spec"]["template"]["spec"]
    if spec.get("terminationGracePeriodSeconds", 30) < 60:
        fail(f"{where}: terminationGracePeriodSeconds must be >= 60 (last batch, checkpoint, commit)")
    vcts = {v["metadata"]["name"] for v in d["spec"].get("volumeClaimTemplates", [])}
    if not vcts:
        fail(f"{where}: no volumeClaimTemplates for the checkpoints")
    svc = services.get(d["spec"].get("serviceName"))
    pod_labels = d["spec"]["template"].get("metadata", {}).get("labels", {})
    if svc is None:
        fail(f"{where}: serviceName {d['spec'].get('serviceName')!r} is not a Service here")
    elif svc["spec"].get("clusterIP") != "None" or not selects(svc["spec"].get("selector"), pod_labels):
        fail(f"{where}: Service {svc['metadata']['name']} must be headless and select the trainer pods")
    for c, args, env, cfg, csc, psc in check_workload(d, configs):
        cw = f"{where} container {c['name']}"
        if "train" not in args:
            fail(f"{cw}: does not run `towerstream train` (args {args})")
        if not c.get("startupProbe"):
            fail(f"{cw}: needs a startupProbe (restoring a checkpoint takes a while)")
        ckpt = str(effective(("checkpoint", "dir"), env, cfg))
        mounts = {m["mountPath"].rstrip("/"): m["name"] for m in c.get("volumeMounts", [])}
        if mounts.get(ckpt.rstrip("/")) not in vcts:
            fail(f"{cw}: checkpoint.dir {ckpt} is not a volumeClaimTemplate's mount ({mounts})")
        if not csc.get("readOnlyRootFilesystem"):
            fail(f"{cw}: readOnlyRootFilesystem should be true (it writes only to the volume)")
        if "fsGroup" not in psc:
            fail(f"{where}: set securityContext.fsGroup so the checkpoint volume is writable")


def check_serve(d, configs, docs):
    where = name_of(d)
    pod_labels = d["spec"]["template"].get("metadata", {}).get("labels", {})
    for c, args, env, cfg, csc, psc in check_workload(d, configs):
        cw = f"{where} container {c['name']}"
        if "serve" not in args:
            fail(f"{cw}: does not run `towerstream serve` (args {args})")
        if not csc.get("readOnlyRootFilesystem"):
            fail(f"{cw}: readOnlyRootFilesystem should be true (serving writes nothing)")
    kinds = {"Service": False, "PodDisruptionBudget": False, "HorizontalPodAutoscaler": False}
    for o in docs:
        k = o.get("kind")
        if k == "Service" and o["spec"].get("clusterIP") != "None" \
                and selects(o["spec"].get("selector"), pod_labels):
            kinds[k] = True
            for p in o["spec"].get("ports", []):
                tp = p.get("targetPort")
                if tp not in ("http", PORT):
                    fail(f"{name_of(o)}: targetPort {tp!r} is not the pods' http port")
        elif k == "PodDisruptionBudget" and selects(o["spec"]["selector"].get("matchLabels"), pod_labels):
            kinds[k] = True
        elif k == "HorizontalPodAutoscaler":
            ref = o["spec"]["scaleTargetRef"]
            if ref.get("kind") == "Deployment" and ref.get("name") == d["metadata"]["name"]:
                kinds[k] = True
                if o["spec"].get("minReplicas", 1) < 2:
                    fail(f"{name_of(o)}: minReplicas below 2 leaves recall without redundancy")
    for k, found in kinds.items():
        if not found:
            fail(f"{where}: no {k} for the serving pods")


def check_manifests(docs):
    for d in docs:
        if d.get("metadata", {}).get("namespace"):
            fail(f"{name_of(d)}: manifests are namespace-free (kubectl apply -k ... -n NAME)")
    configs = check_configmaps(docs)
    services = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Service"}
    statefulsets = [d for d in docs if d.get("kind") == "StatefulSet"]
    deployments = [d for d in docs if d.get("kind") == "Deployment"]
    if len(statefulsets) != 1:
        fail(f"expected one StatefulSet (the trainer), found {len(statefulsets)}")
    if len(deployments) != 1:
        fail(f"expected one Deployment (serving), found {len(deployments)}")
    for d in statefulsets:
        check_trainer(d, configs, services)
    for d in deployments:
        check_serve(d, configs, docs)
    return docs


# ---- Prometheus -----------------------------------------------------------------------------


def check_prometheus_kubernetes():
    path = DEPLOY / "prometheus" / "prometheus-kubernetes.yml"
    conf = yaml.safe_load(path.read_text())
    jobs = conf.get("scrape_configs", [])
    for job in jobs:
        if not job.get("kubernetes_sd_configs"):
            fail(f"{path.name}: job {job.get('job_name')} has no kubernetes_sd_configs")
        sources = set()
        for r in job.get("relabel_configs", []):
            sources.update(r.get("source_labels", []))
            try:
                re.compile(r.get("regex", "(.*)"))
            except re.error as e:
                fail(f"{path.name}: regex {r.get('regex')!r}: {e}")
        for label in ("__meta_kubernetes_pod_label_app_kubernetes_io_name",
                      "__meta_kubernetes_pod_annotation_prometheus_io_scrape",
                      "__meta_kubernetes_pod_annotation_prometheus_io_port",
                      "__meta_kubernetes_pod_annotation_prometheus_io_path"):
            if label not in sources:
                fail(f"{path.name}: job {job.get('job_name')} does not use {label}")
    if not jobs:
        fail(f"{path.name}: no scrape_configs")
    if conf.get("rule_files") != yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml")
                                                .read_text()).get("rule_files"):
        fail(f"{path.name}: rule_files differ from prometheus.yml's")


# ---- Dockerfile -----------------------------------------------------------------------------


def dockerfile_instructions(text):
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if cur and s.startswith("#"):
            continue
        cur += (" " if cur else "") + s.rstrip("\\").strip()
        if not s.endswith("\\"):
            ins, _, rest = cur.partition(" ")
            out.append((ins.upper(), rest.strip()))
            cur = ""
    return out


def substitute(s, args):
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), s)


def check_dockerfile():
    path = DEPLOY / "Dockerfile"
    where = "deploy/Dockerfile"
    global_args, stages = {}, []
    for ins, rest in dockerfile_instructions(path.read_text()):
        if ins == "FROM":
            parts = rest.split()
            stages.append({"from": substitute(parts[0], global_args),
                           "name": parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None,
                           "args": {}, "ins": []})
        elif ins == "ARG":
            k, _, v = rest.partition("=")
            if not stages:
                global_args[k] = v.strip('"')
            else:
                st = stages[-1]
                st["args"][k] = v.strip('"') if v else global_args.get(k, "")
        elif stages:
            stages[-1]["ins"].append((ins, substitute(rest, {**global_args, **stages[-1]["args"]})))
    if len(stages) < 2:
        fail(f"{where}: expected a builder and a runtime stage, found {len(stages)} stages")
        return
    builder, runtime = stages[0], stages[-1]
    bm = re.fullmatch(r"rust:[\d.]+-(\w+)", builder["from"])
    rm = re.fullmatch(r"debian:(\w+)-slim", runtime["from"])
    if not bm or not rm:
        fail(f"{where}: builder must be rust:<version>-<debian>, runtime debian:<release>-slim "
             f"(are {builder['from']}, {runtime['from']})")
        return
    if bm.group(1) != rm.group(1):
        fail(f"{where}: builder ({bm.group(1)}) and runtime ({rm.group(1)}) Debian releases differ "
             "(libstdc++/glibc of libtorch and the binary)")
    py = DEBIAN_PYTHON.get(bm.group(1))
    brun = " ; ".join(r for i, r in builder["ins"] if i == "RUN")
    venv = re.search(r"python3 -m venv \"?([^\"\s]+)\"?", brun)
    if not venv:
        fail(f"{where}: the builder creates no venv (python3 -m venv DIR)")
        return
    expected_lib = f"{venv.group(1)}/lib/python{py}/site-packages/torch/lib"
    torch_lib = builder["args"].get("TORCH_LIB", "")
    if torch_lib != expected_lib:
        fail(f"{where}: TORCH_LIB {torch_lib!r} is not where the builder's venv has torch/lib "
             f"({expected_lib!r}, python{py} on {bm.group(1)})")
    if f'test -f "{torch_lib}/libtorch_cpu.so"' not in brun:
        fail(f"{where}: the builder does not check that {torch_lib}/libtorch_cpu.so exists")
    copies = [r for i, r in runtime["ins"] if i == "COPY" and r.startswith(f"--from={builder['name']}")]
    torch_copies = [c.split()[1:] for c in copies if "torch/lib" in c]
    if not torch_copies:
        fail(f"{where}: the runtime stage does not copy torch/lib from {builder['name']}")
    for src, dst in torch_copies:
        if src.rstrip("/") != torch_lib or dst.rstrip("/") != torch_lib:
            fail(f"{where}: runtime copies {src} to {dst}; both must be the builder's {torch_lib} "
                 "(the binary's rpath)")
    setup = (ROOT / "scripts" / "setup").read_text()
    want = re.search(r"^TORCH_VERSION=(\S+)", setup, re.M).group(1)
    tv = re.search(r'"?torch==([\w.]+)"?', brun)
    if not tv or tv.group(1) != want:
        fail(f"{where}: pip installs torch=={tv.group(1) if tv else '?'}, scripts/setup {want}")
    if "--index-url https://download.pytorch.org/whl/cpu" not in brun:
        fail(f"{where}: torch must come from the CPU index (no CUDA libraries in the image)")
    if "cargo build --release --locked --bin towerstream" not in brun:
        fail(f"{where}: the builder does not run cargo build --release --locked --bin towerstream")
    last = {}
    for ins, rest in runtime["ins"]:
        last[ins] = rest
    user = last.get("USER", "root").split(":")[0]
    if user in ("root", "0", ""):
        fail(f"{where}: the runtime stage must end as a non-root USER")
    if "8080" not in last.get("EXPOSE", "").split():
        fail(f"{where}: EXPOSE 8080 is missing")
    if last.get("ENTRYPOINT", "").replace(" ", "") != '["towerstream","--log-json"]':
        fail(f"{where}: ENTRYPOINT must be [\"towerstream\", \"--log-json\"]")
    if last.get("CMD", "").replace(" ", "") != '["serve"]':
        fail(f"{where}: CMD must be [\"serve\"]")
    return user


def check_dockerignore():
    path = ROOT / ".dockerignore"
    if not path.exists():
        fail(".dockerignore is missing")
        return
    entries = {ln.strip().strip("/") for ln in path.read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    for d in ("target", ".venv", ".cache", "data", "var"):
        if d not in entries:
            fail(f".dockerignore does not exclude {d}/")


def main():
    rendered = sys.argv[1] if len(sys.argv) > 1 else None
    docs = check_manifests(load_docs(rendered))
    image_user = check_dockerfile()
    check_dockerignore()
    check_prometheus_kubernetes()
    if image_user and image_user.isdigit():
        for d in docs:
            if d.get("kind") in ("Deployment", "StatefulSet"):
                uid = d["spec"]["template"]["spec"].get("securityContext", {}).get("runAsUser")
                if uid is not None and str(uid) != image_user:
                    fail(f"{name_of(d)}: runAsUser {uid} is not the image's USER {image_user}")
    if rendered:
        for d in docs:
            if d.get("kind") in ("Deployment", "StatefulSet"):
                for c in d["spec"]["template"]["spec"]["containers"]:
                    if ":" not in c["image"].rsplit("/", 1)[-1] and "@" not in c["image"]:
                        fail(f"{name_of(d)}: rendered image {c['image']} has no tag")
    for e in errors:
        print(f"check-deploy: {e}", file=sys.stderr)
    kinds = sorted({d.get("kind") for d in docs})
    if not errors:
        print(f"{len(docs)} objects ({', '.join(kinds)}), Dockerfile and .dockerignore: structure OK")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
