"""The Dockerfile, checked without building an image (no registry here):
  - stages, base images, user, ports, volume and build arguments;
  - the builder's configure step works and defines the targets whose
    binaries the runtime copies;
  - every file it copies exists and survives .dockerignore, and so does
    every source file the build needs;
  - the runtime package lists name real Debian packages (apt-cache) whose
    dependency closure provides every shared library the built binaries
    need (readelf NEEDED -> dpkg -S), for the CPU and the CUDA variant;
  - the HEALTHCHECK command, run by /bin/sh as Docker would, exits 0 against
    a serving server (plain and TLS) and 1 against a stopped one;
  - the ENTRYPOINT and CMD arguments start the real server."""

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess

import deploy_testlib as t

DOCKERFILE = os.path.join(t.REPO, "Dockerfile")
PACKAGE_LISTS = os.path.join(t.DEPLOY, "docker")
BINARIES = ("mergeguard-server", "mergeguard")


def instructions():
    """[(stage index, INSTRUCTION, arguments)] with continuations joined."""
    with open(DOCKERFILE) as f:
        lines = f.read().splitlines()
    result, current, stage = [], "", -1
    for line in lines:
        if line.lstrip().startswith("#"):
            continue  # comments, also inside continued instructions
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            keyword, _, rest = current.strip().partition(" ")
            keyword = keyword.upper()
            if keyword == "FROM":
                stage += 1
            result.append((stage, keyword, rest.strip()))
        current = ""
    return result


def exec_form(argument):
    argument = argument.strip()
    return json.loads(argument) if argument.startswith("[") else ["/bin/sh", "-c", argument]


def global_args(parsed):
    defaults = {}
    for stage, keyword, rest in parsed:
        if keyword == "ARG" and stage < 0 and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name] = value
    return defaults


def expand(value, defaults):
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), value)


def dockerignore_patterns():
    with open(os.path.join(t.REPO, ".dockerignore")) as f:
        patterns = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    t.check(not any(p.startswith("!") for p in patterns),
            ".dockerignore uses no exceptions (this check does not model them)")
    return patterns


def ignored(path, patterns):
    """Whether `path` (relative to the context) or a parent is excluded."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        regex = fnmatch.translate(pattern.strip("/").replace("**/", "\0"))
        regex = regex.replace("\0", "(?:.*/)?")
        if any(re.match(regex, prefix) for prefix in prefixes):
            return True
    return False


def check_structure(parsed):
    defaults = global_args(parsed)
    stages = [(s, expand(rest, defaults)) for s, k, rest in parsed if k == "FROM"]
    names = {}
    for index, rest in stages:
        image, _, name = rest.partition(" AS ")
        t.check(image.startswith("debian:bookworm"), "stage %d is on Debian bookworm (%s)" % (index, image))
        names[name.strip()] = index
    t.check(len(stages) >= 2, "the Dockerfile is multi-stage")
    final = len(stages) - 1
    t.check(defaults.get("VARIANT") == "cpu", "ARG VARIANT defaults to cpu")

    builder_runs = " ".join(rest for s, k, rest in parsed if k == "RUN" and s < final)
    t.check("scripts/setup" in builder_runs, "the builder installs through scripts/setup")
    t.check("make configure" in builder_runs and "cmake --build" in builder_runs,
            "the builder builds with the Makefile's configure and CMake")
    t.check('"$VARIANT" = cuda' in builder_runs and "Torch_DIR" in builder_runs,
            "VARIANT=cuda builds against another LibTorch")

    final_items = [(k, rest) for s, k, rest in parsed if s == final]
    users = [rest for k, rest in final_items if k == "USER"]
    t.check(users and users[-1].split(":")[0] not in ("0", "root"), "the runtime runs as non-root")
    exposed = " ".join(rest for k, rest in final_items if k == "EXPOSE").split()
    t.check({"50051", "9464"} <= set(exposed), "EXPOSE 50051 9464")
    volumes = [v for k, rest in final_items if k == "VOLUME" for v in exec_form(rest)
               if not v.startswith("/bin/sh")]
    entrypoint = [exec_form(rest) for k, rest in final_items if k == "ENTRYPOINT"]
    t.check(bool(entrypoint) and entrypoint[-1][0] == "mergeguard-server",
            "the entrypoint is mergeguard-server")
    store = [a.split("=", 1)[1] for a in entrypoint[-1] if a.startswith("--store_dir=")] if entrypoint else []
    t.check(store and store[0] in volumes, "the store directory is a VOLUME (%s, %s)" % (store, volumes))
    installs = " ".join(rest for k, rest in final_items if k == "RUN")
    t.check("runtime-packages" in installs and "build-essential" not in installs and "-dev" not in installs,
            "the runtime installs only the runtime package lists")

    patterns = dockerignore_patterns()
    for stage, keyword, rest in parsed:
        if keyword != "COPY":
            continue
        words = shlex.split(rest)
        options = [w for w in words if w.startswith("--")]
        sources = [w for w in words if not w.startswith("--")][:-1]
        source_stage = [o.split("=", 1)[1] for o in options if o.startswith("--from=")]
        if source_stage:
            t.check(source_stage[0] in names and names[source_stage[0]] < stage,
                    "COPY --from=%s names an earlier stage" % source_stage[0])
            continue
        for source in sources:
            if source == ".":
                continue
            t.check(os.path.exists(os.path.join(t.REPO, source)), "COPY source %s exists" % source)
            t.check(not ignored(source, patterns), "COPY source %s is not in .dockerignore" % source)

    # Everything the build reads must reach the context; build trees must not.
    listed = t.run(["git", "ls-files"], cwd=t.REPO)
    if listed.returncode == 0:
        tracked = listed.stdout.split()
    else:  # not a git checkout: every file under the source folders
        tracked = [os.path.relpath(os.path.join(d, f), t.REPO)
                   for top in ("core", "server", "client", "proto", "bench", "cmake", "scripts")
                   for d, _, names in os.walk(os.path.join(t.REPO, top)) for f in names]
        tracked += ["CMakeLists.txt", "Makefile"]
    needed = [p for p in tracked if p.split("/")[0] in
              ("core", "server", "client", "proto", "bench", "cmake", "scripts")
              or p in ("CMakeLists.txt", "Makefile")]
    t.check(len(needed) > 50, "git lists the sources (%d)" % len(needed))
    lost = [p for p in needed if ignored(p, patterns)]
    t.check(not lost, ".dockerignore keeps the build's sources (drops %s)" % lost[:5])
    for path in ("build", "build-server/x", ".git/config", ".cache/npm"):
        t.check(ignored(path, patterns), ".dockerignore drops %s" % path)
    return final_items


def check_builder_configure(parsed):
    """The builder's configure step (the Makefile's, tests off) works on these
    sources and defines the targets it builds; those are what the runtime
    copies from /build/bin."""
    builder_runs = " ".join(rest for s, k, rest in parsed if k == "RUN" and s == 0)
    targets = re.search(r"cmake --build /build --target ((?:\w[\w-]* ?)+)", builder_runs)
    if not t.check(targets, "the builder names its CMake targets"):
        return
    targets = targets.group(1).split()
    copied = [os.path.basename(w) for s, k, rest in parsed if k == "COPY" and "--from=builder" in rest
              for w in shlex.split(rest) if w.startswith("/build/bin/")]
    t.check(sorted(copied) == sorted(targets) == sorted(BINARIES),
            "the runtime copies exactly the built targets (%s, %s)" % (copied, targets))
    build = t.temp_dir("mergeguard-docker-configure")
    try:
        configure = t.run(["make", "configure", "BUILD_DIR=" + build,
                           "CMAKE_FLAGS=-DMERGEGUARD_BUILD_TESTS=OFF"], cwd=t.REPO)
        t.check(configure.returncode == 0, "make configure (tests off):\n" + configure.stdout[-2000:] +
                configure.stderr[-2000:])
        if configure.returncode == 0:
            dry = t.run(["cmake", "--build", build, "--target"] + targets + ["--", "-n"])
            t.check(dry.returncode == 0, "the targets exist: " + dry.stdout[-1000:] + dry.stderr[-1000:])
    finally:
        shutil.rmtree(build, ignore_errors=True)


def read_packages(name):
    with open(os.path.join(PACKAGE_LISTS, name)) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def closure(packages):
    result = t.run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
                    "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances"] + packages)
    names = set()
    for line in result.stdout.splitlines():
        line = line.strip().lstrip("|")
        if ":" in line:
            line = line.split(":", 1)[1].strip()
        if line and not line.startswith("<"):
            names.add(line.split(":")[0])
    return names


_LDCONFIG_CACHE = []


def library_owner(soname):
    if not _LDCONFIG_CACHE:
        # ldconfig is in /sbin, which a non-root PATH may lack.
        ldconfig = shutil.which("ldconfig") or next(
            (p for p in ("/usr/sbin/ldconfig", "/sbin/ldconfig") if os.path.exists(p)), "ldconfig")
        _LDCONFIG_CACHE.append(t.run([ldconfig, "-p"]).stdout)
    for line in _LDCONFIG_CACHE[0].splitlines():
        line = line.strip()
        if line.startswith(soname + " "):
            path = line.rsplit("=> ", 1)[1]
            for candidate in (path, os.path.realpath(path)):
                owner = t.run(["dpkg", "-S", candidate])
                if owner.returncode == 0:
                    return owner.stdout.split(":")[0].strip()
    return None


def check_packages():
    t.require_tool("apt-cache", "apt")
    t.require_tool("readelf", "binutils")
    common = read_packages("runtime-packages")
    cpu = read_packages("runtime-packages.cpu")
    for package in common + cpu:
        shown = t.run(["apt-cache", "show", package])
        t.check(shown.returncode == 0 and ("Package: %s\n" % package) in shown.stdout,
                "apt-cache show %s: a Debian package" % package)
    cpu_closure = closure(common + cpu)
    cuda_closure = closure(common)
    for binary in BINARIES:
        path = os.path.join(t.BIN, binary)
        dynamic = t.run(["readelf", "-d", path])
        t.check(dynamic.returncode == 0, "readelf -d %s" % path)
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic.stdout)
        t.check(len(needed) > 5, "%s has NEEDED entries" % binary)
        for soname in needed:
            owner = library_owner(soname)
            if not t.check(owner is not None, "%s: %s belongs to a Debian package" % (binary, soname)):
                continue
            t.check(owner in cpu_closure,
                    "%s: %s (%s) is installed in the CPU image" % (binary, soname, owner))
            if owner not in cpu:  # LibTorch itself comes from /opt/libtorch
                t.check(owner in cuda_closure,
                        "%s: %s (%s) is installed in the CUDA image" % (binary, soname, owner))


def check_running(final_items):
    healthcheck = [rest for k, rest in final_items if k == "HEALTHCHECK"]
    if not t.check(len(healthcheck) == 1 and " CMD " in " " + healthcheck[0],
                   "one HEALTHCHECK with a CMD"):
        return
    command = healthcheck[0].split("CMD", 1)[1].strip()
    t.check(command.startswith("mergeguard health"), "HEALTHCHECK runs `mergeguard health`")
    # Docker's 10 s are for a server; a loaded 2-core test machine gets more.
    command = re.sub(r"--timeout \d+", "--timeout 60", command)
    t.check("--timeout 60" in command, "HEALTHCHECK sets a --timeout")
    env = {}
    for k, rest in final_items:
        if k == "ENV":
            for word in shlex.split(rest):
                name, _, value = word.partition("=")
                env[name] = value
    entrypoint = [exec_form(rest) for k, rest in final_items if k == "ENTRYPOINT"][-1]
    cmd = [exec_form(rest) for k, rest in final_items if k == "CMD"][-1]

    root = t.temp_dir("mergeguard-docker")
    servers = []
    try:
        tokens, _ = t.write_tokens(root)
        mapping = {"/var/lib/mergeguard": os.path.join(root, "store"),
                   "/etc/mergeguard/tokens/tokens": tokens}
        args = []
        for arg in entrypoint[1:] + cmd:
            name, _, value = arg.partition("=")
            args.append(name + "=" + mapping.get(value, value) if value else arg)
        t.check(any(a.startswith("--tokens_file=" + tokens) for a in args),
                "the entrypoint reads /etc/mergeguard/tokens/tokens")
        plain = t.Server(os.path.join(root), args + ["--replica=test"])
        servers.append(plain)

        def healthcheck_exit(server_address, extra_env=None):
            environment = dict(os.environ)
            environment.update(env)
            environment.pop("MERGEGUARD_HEALTH_TLS_CA", None)
            environment["PATH"] = t.BIN + os.pathsep + environment["PATH"]
            environment["MERGEGUARD_SERVER"] = server_address
            environment.update(extra_env or {})
            result = subprocess.run(["/bin/sh", "-c", command], env=environment,
                                    capture_output=True, text=True, timeout=120)
            return result.returncode, result.stdout + result.stderr

        code, output = healthcheck_exit("127.0.0.1:%d" % plain.port)
        t.check(code == 0 and "SERVING" in output, "HEALTHCHECK passes on a serving server: " + output)

        tls_root = os.path.join(root, "tls")
        os.makedirs(tls_root)
        certs = t.make_tls_certificates(tls_root)
        tls = t.Server(tls_root, args + ["--replica=test", "--tls_cert=" + certs["tls.crt"],
                                         "--tls_key=" + certs["tls.key"]])
        servers.append(tls)
        code, output = healthcheck_exit("localhost:%d" % tls.port,
                                        {"MERGEGUARD_HEALTH_TLS_CA": certs["ca.crt"]})
        t.check(code == 0 and "SERVING" in output, "HEALTHCHECK passes with TLS: " + output)
        code, output = healthcheck_exit("localhost:%d" % tls.port)
        t.check(code == 1, "HEALTHCHECK fails (exit 1) on TLS without the CA: %d %s" % (code, output))

        port = plain.port
        plain.stop()
        code, output = healthcheck_exit("127.0.0.1:%d" % port)
        t.check(code == 1, "HEALTHCHECK exits 1 (unhealthy) once the server is gone: %d %s" % (code, output))
    except (RuntimeError, subprocess.SubprocessError) as error:
        t.fail("running the image's commands: %s" % error)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def main():
    parsed = instructions()
    final_items = check_structure(parsed)
    check_builder_configure(parsed)
    check_packages()
    check_running(final_items)
    with open(os.path.join(t.REPO, "docs", "deploy.md")) as f:
        docs = f.read()
    t.check("--build-arg VARIANT=cuda" in docs and "LIBTORCH_URL" in docs,
            "docs/deploy.md documents the CUDA build arguments")
    t.finish()


if __name__ == "__main__":
    main()
