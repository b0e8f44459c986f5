#!/usr/bin/env python3
"""Lints Dockerfile.cpu / Dockerfile.cuda and runs their build steps on this machine.

No container engine runs on the development machines, so this script does what `docker build`
and `docker run` would, with the commands taken from the Dockerfile itself:
  1. lint: multi-stage, pinned base images, apt hygiene, non-root numeric USER, exec-form
     ENTRYPOINT/CMD/HEALTHCHECK on the gRPC health service, the ports Kubernetes expects;
  2. packages: every apt-get install of every stage resolves against Debian 12 here
     (`apt-get install -s`, changes nothing); NVIDIA's cuda-* packages cannot be, the local
     CUDA toolkit stands in for them;
  3. builder: copies the repository filtered by <Dockerfile>.dockerignore (the build context)
     and runs the builder stage's build.sh command on it, /src, /build and /out mapped to a
     temporary directory;
  4. runtime: stages COPY --from into a root, checks that every shared library the programs
     load belongs to a package the runtime stage installs (or to debian:12-slim itself), then
     runs ENTRYPOINT + CMD as the image's USER uid, waits for the HEALTHCHECK command to pass,
     runs the preStop hook, sends STOPSIGNAL and checks a clean exit and a failing health check.
Ports 50051 and 9464 become free ephemeral ports.

Usage: check.py [--flavor cpu|cuda] [--prebuilt BIN_DIR] [--jobs N]
  --prebuilt BIN_DIR  configure as the Dockerfile does, then stage the binaries in BIN_DIR instead
                      of compiling (tests/deploy passes the test build's; a full compile of the
                      two programs takes minutes on 2 cores)
Prints PASS/FAIL lines and "N passed, M failed"; exits 1 on any failure, 77 when the flavor
cannot be checked on this machine (cuda without nvcc).
"""
import argparse
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
GRPC_PORT, METRICS_PORT = 50051, 9464
# Packages debian:12-slim already has (Essential/required), so the runtime stage need not list them.
SLIM_BASE = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g"}

passed = failed = 0


def ok(msg):
    global passed
    passed += 1
    print("PASS: " + msg, flush=True)


def bad(msg):
    global failed
    failed += 1
    print("FAIL: " + msg, flush=True)


def check(cond, msg, detail=""):
    (ok if cond else bad)(msg + ("" if cond or not detail else ": " + detail))
    return cond


# ---------------------------------------------------------------- parsing


def parse_dockerfile(text):
    """Instructions as dicts {cmd, args, line}, continuation lines joined, comments dropped."""
    out, buf, start = [], "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\n")
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):  # comment inside a continued instruction
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        cmd, _, args = buf.strip().partition(" ")
        out.append({"cmd": cmd.upper(), "args": args.strip(), "line": start})
        buf = ""
    return out


def stages_of(instrs):
    """[(stage dict, [instructions])]: global ARGs before the first FROM are stage None."""
    stages, glob = [], []
    for ins in instrs:
        if ins["cmd"] == "FROM":
            m = re.match(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?$", ins["args"], re.I)
            stages.append({"image": m.group(1), "alias": m.group(2), "line": ins["line"],
                           "instrs": []})
        elif stages:
            stages[-1]["instrs"].append(ins)
        else:
            glob.append(ins)
    return glob, stages


def arg_defaults(instrs):
    d = {}
    for ins in instrs:
        if ins["cmd"] == "ARG":
            name, _, val = ins["args"].partition("=")
            d[name.strip()] = val.strip()
    return d


def expand(text, env):
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), m.group(0)),
                  text)


def exec_form(args):
    try:
        v = json.loads(args)
        return v if isinstance(v, list) and all(isinstance(x, str) for x in v) else None
    except ValueError:
        return None


def healthcheck_cmd(args):
    """(options dict, exec-form command) of a HEALTHCHECK."""
    opts = dict(re.findall(r"--(\w[\w-]*)=(\S+)", args))
    _, _, rest = args.partition("CMD")
    return opts, exec_form(rest.strip())


def apt_packages(run_args):
    """Packages of every `apt-get install` in one RUN (options and shell words skipped)."""
    pkgs = []
    for seg in re.split(r"&&|;|\|\|", run_args):
        words = shlex.split(seg)
        if "apt-get" in words and "install" in words:
            after = words[words.index("install") + 1:]
            pkgs += [w for w in after if not w.startswith("-")]
    return pkgs


# ---------------------------------------------------------------- lint


def lint(name, instrs):
    glob, stages = stages_of(instrs)
    check(len(stages) >= 2 and stages[0]["alias"], f"{name}: multi-stage (named builder + runtime)",
          f"{len(stages)} stage(s)")
    for st in stages:
        img = st["image"]
        check(":" in img and not img.endswith(":latest"),
              f"{name}:{st['line']}: base image {img} pinned to a tag")
    aliases = set()
    declared_global = set(arg_defaults(glob))
    for st in stages:
        declared = set()
        for ins in st["instrs"]:
            where = f"{name}:{ins['line']}"
            if ins["cmd"] == "ARG":
                declared.add(ins["args"].partition("=")[0].strip())
            if ins["cmd"] == "ADD":
                bad(f"{where}: ADD (use COPY; ADD fetches URLs and unpacks archives)")
            if ins["cmd"] == "COPY":
                m = re.search(r"--from=(\S+)", ins["args"])
                if m:
                    check(m.group(1) in aliases, f"{where}: COPY --from={m.group(1)} names an earlier stage")
            if ins["cmd"] in ("RUN", "ENV"):
                for var in re.findall(r"\$\{(\w+)\}", ins["args"]):
                    if var in declared_global and var not in declared:
                        bad(f"{where}: ${{{var}}} used without ARG {var} in this stage (it expands empty)")
            if ins["cmd"] == "RUN":
                if "sudo " in ins["args"]:
                    bad(f"{where}: sudo in RUN")
                if "apt-get install" in ins["args"]:
                    a = ins["args"]
                    check("--no-install-recommends" in a and re.search(r"\s-y\b", a) is not None
                          and "apt-get update" in a.split("apt-get install")[0]
                          and a.rstrip().endswith("rm -rf /var/lib/apt/lists/*"),
                          f"{where}: apt-get update + install -y --no-install-recommends + list "
                          f"cleanup in one RUN")
                for opts in re.findall(r"\bcurl\s+(-\S+)", ins["args"]):
                    check("f" in opts.lstrip("-"), f"{where}: curl {opts} fails on HTTP errors (-f)")
        if st["alias"]:
            aliases.add(st["alias"])
    final = stages[-1]["instrs"]
    cmds = [i["cmd"] for i in final]
    users = [i for i in final if i["cmd"] == "USER"]
    uid = None
    if check(len(users) == 1, f"{name}: runtime stage sets USER once"):
        m = re.fullmatch(r"(\d+)(?::(\d+))?", users[0]["args"])
        if check(m is not None and int(m.group(1)) != 0,
                 f"{name}: USER is a numeric non-root uid ({users[0]['args']}), so that "
                 f"Kubernetes runAsNonRoot can verify it"):
            uid = (int(m.group(1)), int(m.group(2) or m.group(1)))
        check(cmds.index("USER") < cmds.index("ENTRYPOINT") if "ENTRYPOINT" in cmds else False,
              f"{name}: USER comes before ENTRYPOINT")
    hc = [i for i in final if i["cmd"] == "HEALTHCHECK"]
    hopts, hcmd = healthcheck_cmd(hc[0]["args"]) if hc else ({}, None)
    check(hcmd is not None and "health" in hcmd and any(f":{GRPC_PORT}" in w for w in hcmd),
          f"{name}: HEALTHCHECK runs the gRPC health check on port {GRPC_PORT} (exec form)")
    check(all(k in hopts for k in ("interval", "timeout", "start-period", "retries")),
          f"{name}: HEALTHCHECK sets interval, timeout, start-period and retries")
    ep = [exec_form(i["args"]) for i in final if i["cmd"] == "ENTRYPOINT"]
    cmd = [exec_form(i["args"]) for i in final if i["cmd"] == "CMD"]
    check(len(ep) == 1 and ep[0] is not None and len(cmd) == 1 and cmd[0] is not None,
          f"{name}: ENTRYPOINT and CMD in exec form (signals reach the server, no shell)")
    ports = set()
    for i in final:
        if i["cmd"] == "EXPOSE":
            ports |= {int(p.split("/")[0]) for p in i["args"].split()}
    check(ports == {GRPC_PORT, METRICS_PORT}, f"{name}: EXPOSE {GRPC_PORT} and {METRICS_PORT}",
          str(sorted(ports)))
    check(any(i["cmd"] == "STOPSIGNAL" and i["args"] == "SIGTERM" for i in final),
          f"{name}: STOPSIGNAL SIGTERM (the server drains on SIGTERM)")
    return {"stages": stages, "glob": glob, "uid": uid, "hc": (hopts, hcmd),
            "entrypoint": ep[0] if ep else None, "cmd": cmd[0] if cmd else None}


# ---------------------------------------------------------------- build steps


def dockerignore_patterns(path):
    pats = []
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line and not line.startswith("#"):
                pats.append(line.rstrip("/"))
    return pats


def ignored(rel, pats):
    parts = rel.split("/")
    for p in pats:
        pp = p.split("/")
        # a pattern matches the path or any of its parent directories; ** spans directories
        for k in range(1, len(parts) + 1):
            if match_parts(pp, parts[:k]):
                return True
    return False


def match_parts(pat, parts):
    if not pat:
        return not parts
    if pat[0] == "**":
        return any(match_parts(pat[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pat[0]) and match_parts(pat[1:], parts[1:])


def copy_context(dst, pats):
    n = 0
    for root, dirs, files in os.walk(REPO):
        rel_root = os.path.relpath(root, REPO)
        rel_root = "" if rel_root == "." else rel_root + "/"
        dirs[:] = [d for d in dirs if not ignored(rel_root + d, pats)]
        for f in files:
            rel = rel_root + f
            if ignored(rel, pats):
                continue
            os.makedirs(os.path.join(dst, rel_root), exist_ok=True)
            shutil.copy2(os.path.join(root, f), os.path.join(dst, rel), follow_symlinks=False)
            n += 1
    return n


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def map_ports(words, gp, mp):
    return [w.replace(f":{GRPC_PORT}", f":{gp}").replace(f":{METRICS_PORT}", f":{mp}")
            .replace("0.0.0.0:", "127.0.0.1:") for w in words]


def dpkg_file_owners():
    """Path -> package for every installed file (one pass over dpkg's lists; `dpkg -S` per
    library takes seconds each)."""
    owner, info = {}, "/var/lib/dpkg/info"
    for f in os.listdir(info):
        if f.endswith(".list"):
            pkg = f[:-5].split(":")[0]
            with open(os.path.join(info, f), errors="replace") as fh:
                for line in fh:
                    owner.setdefault(line.rstrip("\n"), pkg)
    return owner


def owning_packages(binaries):
    libs = set()
    for b in binaries:
        out = subprocess.run(["ldd", b], capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.search(r"=>\s+(/\S+)", line)
            if m:
                libs.add(m.group(1))
            elif "not found" in line:
                libs.add("MISSING:" + line.split()[0])
    owner = dpkg_file_owners()
    pkgs, unknown = set(), []
    for lib in sorted(libs):
        real = os.path.realpath(lib)
        # merged /usr: dpkg may list a library under /lib or /usr/lib
        cands = (lib, real, "/usr" + real, real.replace("/usr/", "/", 1))
        found = [owner[c] for c in cands if c in owner]
        if found:
            pkgs.add(found[0])
        else:
            unknown.append(lib)
    return pkgs, unknown


def build_steps(name, flavor, info, work, prebuilt, jobs):
    stages, env = info["stages"], arg_defaults(info["glob"])
    # 2. packages
    for st in stages:
        for ins in st["instrs"]:
            if ins["cmd"] != "RUN":
                continue
            pkgs = [expand(p, env) for p in apt_packages(ins["args"])]
            debian = [p for p in pkgs if not p.startswith("cuda-")]
            nvidia = [p for p in pkgs if p.startswith("cuda-")]
            if debian:
                r = subprocess.run(["apt-get", "install", "-s", "-y", "--no-install-recommends"]
                                   + debian, capture_output=True, text=True)
                check(r.returncode == 0, f"{name}:{ins['line']}: apt-get install -s of "
                      f"{len(debian)} Debian 12 packages resolves", r.stderr.strip()[-400:])
            if nvidia:
                nvcc = os.path.exists("/usr/local/cuda/bin/nvcc")
                check(nvcc, f"{name}:{ins['line']}: {' '.join(nvidia)} come from NVIDIA's "
                      f"repository; the local toolkit /usr/local/cuda stands in")
    # 3. builder: the build.sh RUN of the first stage, paths mapped
    builder = stages[0]
    runs = [i for i in builder["instrs"] if i["cmd"] == "RUN" and "build.sh" in i["args"]]
    if not check(len(runs) == 1, f"{name}: builder stage has one build.sh RUN"):
        return None
    ctx, build, out = (os.path.join(work, d) for d in ("src", "build", "out"))
    n = copy_context(ctx, dockerignore_patterns(os.path.join(HERE, name + ".dockerignore")))
    ok(f"{name}: build context copied through {name}.dockerignore ({n} files)")
    mapping = {"/src": ctx, "/build": build, "/out": out}
    words = [mapping.get(w, w) for w in shlex.split(expand(runs[0]["args"], env))]
    words = [os.path.join(ctx, w) if w.startswith("deploy/") else w for w in words]
    benv = dict(os.environ)
    if prebuilt:
        benv["SPARSEKV_PREBUILT_BIN"] = prebuilt
    if jobs:
        benv["SPARSEKV_BUILD_JOBS"] = str(jobs)
    t0 = time.time()
    r = subprocess.run(words, cwd=ctx, env=benv, capture_output=True, text=True)
    what = "configure + stage prebuilt binaries" if prebuilt else "configure + compile + stage"
    if not check(r.returncode == 0, f"{name}: builder RUN ({what}) in {time.time() - t0:.0f}s",
                 (r.stdout + r.stderr)[-1500:]):
        return None
    if flavor == "cuda":
        cache = open(os.path.join(build, "CMakeCache.txt")).read()
        check("SPARSEKV_ENABLE_CUDA:BOOL=ON" in cache and "CMAKE_CUDA_COMPILER:" in cache,
              f"{name}: the builder configured the CUDA build (SPARSEKV_ENABLE_CUDA=ON, nvcc found)")
    # 4. runtime root from COPY --from
    root = os.path.join(work, "rootfs")
    for ins in stages[-1]["instrs"]:
        if ins["cmd"] == "COPY" and "--from=" in ins["args"]:
            words = [w for w in shlex.split(ins["args"]) if not w.startswith("--")]
            src, dst = words[0], words[1]
            src_local = os.path.join(out, os.path.relpath(src, "/out"))
            if check(src.startswith("/out/") and os.path.isdir(src_local),
                     f"{name}:{ins['line']}: COPY --from source {src} exists after the build"):
                shutil.copytree(src_local, root + dst, dirs_exist_ok=True)
    return root


def runtime_steps(name, info, root):
    ep, cmd, uid = info["entrypoint"], info["cmd"], info["uid"]
    hopts, hcmd = info["hc"]
    final = info["stages"][-1]
    env = arg_defaults(info["glob"])
    env.update(arg_defaults(final["instrs"]))
    listed = set()
    for ins in final["instrs"]:
        if ins["cmd"] == "RUN":
            listed |= {expand(p, env) for p in apt_packages(ins["args"])}
    bins = [root + p for p in (ep[0], hcmd[0])]
    for b in bins:
        check(os.access(b, os.X_OK), f"{name}: {b[len(root):]} staged and executable")
    pkgs, unknown = owning_packages(bins)
    check(not unknown, f"{name}: every shared library resolves to a Debian package", str(unknown))
    missing = sorted(pkgs - listed - SLIM_BASE)
    check(not missing, f"{name}: the runtime stage installs every package the programs load "
          f"({len(pkgs)} packages)", "missing: " + " ".join(missing))
    prestop = root + "/usr/local/bin/sparsekv-prestop"
    check(os.access(prestop, os.X_OK), f"{name}: preStop hook staged at /usr/local/bin/sparsekv-prestop")

    gp, mp = free_port(), free_port()
    argv = map_ports([root + ep[0]] + ep[1:] + cmd, gp, mp)
    health = map_ports([root + hcmd[0]] + hcmd[1:], gp, mp)
    as_user = []
    if os.geteuid() == 0 and uid:
        # run as the image's USER (uid need not exist here, as in the image before useradd)
        as_user = ["setpriv", f"--reuid={uid[0]}", f"--regid={uid[1]}", "--clear-groups"]
    log = open(os.path.join(os.path.dirname(root), "server.log"), "w")
    proc = subprocess.Popen(as_user + argv, stdout=log, stderr=subprocess.STDOUT, cwd="/")
    try:
        start_period = parse_seconds(hopts.get("start-period", "10s"))
        deadline, healthy, tries = time.time() + start_period + 5, False, 0
        while time.time() < deadline and proc.poll() is None:
            tries += 1
            r = subprocess.run(as_user + health, capture_output=True, text=True, timeout=30)
            if r.returncode == 0:
                healthy = True
                break
            time.sleep(0.2)
        check(healthy, f"{name}: ENTRYPOINT+CMD as uid {uid[0] if uid else os.geteuid()} serves; "
              f"HEALTHCHECK command exits 0 (try {tries})",
              open(log.name).read()[-800:])
        if healthy:
            penv = dict(os.environ, SPARSEKV_METRICS_PORT=str(mp), SPARSEKV_DRAIN_PROPAGATION_S="0",
                        SPARSEKV_DRAIN_IDLE_S="1", SPARSEKV_DRAIN_MAX_S="10")
            r = subprocess.run(as_user + ["bash", prestop], env=penv, capture_output=True, text=True,
                               timeout=30)
            check(r.returncode == 0 and "drained" in r.stderr,
                  f"{name}: preStop hook drains an idle server", r.stderr.strip())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "killed"
    check(rc == 0, f"{name}: server exits 0 on STOPSIGNAL SIGTERM", f"exit {rc}")
    r = subprocess.run(as_user + health, capture_output=True, text=True, timeout=30)
    check(r.returncode != 0, f"{name}: HEALTHCHECK fails once the server is gone (exit {r.returncode})")


def lint_self_test():
    """The lint must fail on Dockerfiles that break its rules: each mutation of Dockerfile.cpu
    must produce at least one failure."""
    global passed, failed
    text = open(os.path.join(HERE, "Dockerfile.cpu")).read()
    mutations = {
        "root user": ("USER 10001:10001", "USER root"),
        "no health check": ("HEALTHCHECK ", "# HEALTHCHECK "),
        "apt lists kept": ("rm -rf /var/lib/apt/lists/*", "true"),
        "unpinned base image": ("FROM debian:12-slim", "FROM debian"),
        "shell-form entrypoint": ('ENTRYPOINT ["/usr/local/bin/sparsekv-server"]',
                                  "ENTRYPOINT /usr/local/bin/sparsekv-server"),
    }
    results = []
    for what, (old, new) in mutations.items():
        if old not in text:
            results.append((what, False))
            continue
        saved = (passed, failed)
        out = sys.stdout
        sys.stdout = open(os.devnull, "w")
        try:
            lint("mutant", parse_dockerfile(text.replace(old, new)))
        finally:
            sys.stdout.close()
            sys.stdout = out
        caught = failed > saved[1]
        passed, failed = saved
        results.append((what, caught))
    missed = [w for w, c in results if not c]
    check(not missed, f"lint catches broken copies of Dockerfile.cpu ({', '.join(w for w, _ in results)})",
          "missed: " + ", ".join(missed))


def parse_seconds(s):
    m = re.fullmatch(r"(\d+)(ms|s|m)", s)
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)] if m else 10


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flavor", choices=["cpu", "cuda"], action="append")
    ap.add_argument("--prebuilt", help="directory with sparsekv-server and sparsekv to stage")
    ap.add_argument("--jobs", type=int, default=0)
    a = ap.parse_args()
    flavors = a.flavor or ["cpu", "cuda"]
    if flavors == ["cuda"] and not os.path.exists("/usr/local/cuda/bin/nvcc"):
        print("SKIP: no CUDA toolkit at /usr/local/cuda: the CUDA builder cannot run here")
        sys.exit(77)
    if a.prebuilt:
        ldd = subprocess.run(["ldd", os.path.join(a.prebuilt, "sparsekv-server")],
                             capture_output=True, text=True).stdout
        if re.search(r"lib(asan|ubsan|tsan)", ldd):
            print("SKIP: the prebuilt binaries are a sanitizer build; images build without")
            sys.exit(77)
    lint_self_test()
    for flavor in flavors:
        name = f"Dockerfile.{flavor}"
        info = lint(name, parse_dockerfile(open(os.path.join(HERE, name)).read()))
        work = tempfile.mkdtemp(prefix=f"sparsekv-docker-{flavor}.")
        os.chmod(work, 0o755)  # the image's uid must read the staged root
        try:
            root = build_steps(name, flavor, info, work, a.prebuilt, a.jobs)
            if root and info["entrypoint"] and info["hc"][1]:
                runtime_steps(name, info, root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
