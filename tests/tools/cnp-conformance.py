#!/usr/bin/env python3
"""Turn the ClusterNetworkPolicy (v1alpha2) conformance cases of a
kubernetes-sigs/network-policy-api checkout into Bulkhead scenario
directories (../shared/design/scenario.md).

    tests/tools/cnp-conformance.py NETWORK_POLICY_API_CHECKOUT

writes tests/clusters/houses.yaml (the suite's namespaces and pods, with
every port the suite's servers listen on) and tests/scenarios/cnp-*/ (one
per conformance test: its manifests, then one step per subtest with the
policy as the subtest changed it and its probes).

Each Go test is read as the sequence of calls it makes: GetPod names a
server, GetClusterNetworkPolicy / GetNamespace pick what the next mutation
edits, the mutations the suite uses (swapping rules, setting an action or
the priority, prepending a rule, relabelling a namespace, deleting a
NetworkPolicy) are replayed on a copy, a Patch makes the copy current, and
PokeServer becomes a probe. A line the reader does not understand stops it
with its text, so a new upstream case is never half translated.
"""

import copy
import pathlib
import re
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLUSTER = "tests/clusters/houses.yaml"
# Optional features of the suite Bulkhead leaves out (README: ClusterNetworkPolicy): their cases are
# listed as skipped rather than translated.
UNSUPPORTED = {"SupportClusterNetworkPolicyEgressNodePeers": "nodes peers"}


def git_show(checkout, path):
    return subprocess.run(
        ["git", "-C", checkout, "show", f"HEAD:{path}"], check=True, capture_output=True, text=True
    ).stdout


def load(checkout, path):
    """A YAML file of the suite. The host-network servers' ports are Go template values the suite fills
    in at run time; they serve the `nodes` peer cases, which Bulkhead does not support (README), so a
    fixed placeholder is enough to read the file (the host-network StatefulSet is left out of the
    cluster)."""
    text = re.sub(r"\{\{ index \.HostNetworkPorts (\d+) \}\}", lambda m: str(34000 + int(m.group(1))),
                  git_show(checkout, path))
    return yaml.safe_load_all(text)


def served_ports(container):
    """The ports a conformance server container listens on: (port, protocol, name)."""
    ports = [(p["containerPort"], p.get("protocol", "TCP"), p.get("name")) for p in container.get("ports", [])]
    command = " ".join(container.get("command", []))
    match = re.search(r"--(tcp|udp) .*--port (\d+)", command)
    if match:
        ports.append((int(match.group(2)), match.group(1).upper(), None))
    for env in container.get("env", []):
        match = re.fullmatch(r"SERVE_SCTP_PORT_(\d+)", env["name"])
        if match:
            ports.append((int(match.group(1)), "SCTP", None))
    unique = {}
    for port, protocol, name in ports:
        if name or (port, protocol) not in unique:
            unique[(port, protocol)] = name
    return [(port, protocol, name) for (port, protocol), name in unique.items()]


def cluster(checkout):
    """The suite's base manifests as namespaces and pods, and the pods in file order."""
    documents = [d for d in load(checkout, "conformance/base/manifests.yaml") if d]
    out, pods = [], []
    for doc in documents:
        if doc["kind"] == "Namespace":
            out.append({"apiVersion": "v1", "kind": "Namespace", "metadata": doc["metadata"]})
    for doc in documents:
        if doc["kind"] != "StatefulSet":
            continue
        template = doc["spec"]["template"]
        if template["spec"].get("hostNetwork"):
            continue
        ports = []
        for container in template["spec"]["containers"]:
            for port, protocol, name in served_ports(container):
                entry = {"containerPort": port, "protocol": protocol}
                if name:
                    entry["name"] = name
                ports.append(entry)
        for ordinal in range(doc["spec"]["replicas"]):
            name = f"{doc['metadata']['name']}-{ordinal}"
            namespace = doc["metadata"]["namespace"]
            pods.append((namespace, name))
            out.append({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": template["metadata"]["labels"]},
                "spec": {"containers": [{"name": "server", "ports": ports}]},
            })
    return out, pods


def pod_ip(pods, namespace, name):
    """The address the runners give a pod without one: 10.244.1.(10 + its index)."""
    index = pods.index((namespace, name))
    return f"10.244.{1 + index // 200}.{10 + index % 200}"


def normalized(doc):
    """A NetworkPolicy's `podSelector:` left null means every pod, as the API server reads it."""
    if doc.get("kind") == "NetworkPolicy" and doc["spec"].get("podSelector") is None:
        doc["spec"]["podSelector"] = {}
    return doc


def scenario_name(short):
    words = re.sub(r"(?<!^)(?=[A-Z][a-z])|(?<=[a-z])(?=[A-Z])", "-", short).lower()
    return "cnp-" + words.removeprefix("cnp-")


class Unknown(Exception):
    pass


def translate(checkout, path, pods):
    """One Go conformance file: [(scenario name, manifests, steps)]."""
    text = git_show(checkout, path)
    tests = []
    for block in re.split(r"\nvar ", text)[1:]:
        short = re.search(r'ShortName:\s*"(\w+)"', block).group(1)
        features = re.findall(r"suite\.(Support\w+)", block)
        left_out = [UNSUPPORTED[f] for f in features if f in UNSUPPORTED]
        if left_out:
            print(f"{scenario_name(short)}: skipped, needs {', '.join(left_out)}")
            continue
        manifests = re.findall(r'"(base/[^"]+\.yaml)"', re.search(r"Manifests:\s*\[\]string\{([^}]*)\}", block).group(1))
        objects = {}
        for manifest in manifests:
            for doc in load(checkout, "conformance/" + manifest):
                if doc:
                    doc = normalized(doc)
                    objects[(doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"])] = doc
        tests.append((short, block, objects))
    out = []
    for short, block, objects in tests:
        steps, files = [], {"policies.yaml": list(objects.values())}
        first = {"apply": ["policies.yaml"], "probes": []}
        current = None
        servers, target, working, namespace_target, variables = {}, None, None, None, {}
        step = first
        lines = [l.strip() for l in block.split("\n")]
        i = 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if not line or line.startswith("//"):
                continue
            if line.startswith("/*"):
                while "*/" not in line:
                    line = lines[i]
                    i += 1
                continue
            if line.startswith("t.Run("):
                # What a subtest does before its first probe joins the step that applied the
                # manifests when nothing has been probed yet.
                if step is first and not step["probes"]:
                    continue
                steps.append(step)
                step = {"probes": []}
                continue
            m = re.match(r'(\w+) :?= kubernetes\.GetPod\(t, s\.Client, "([\w-]+)", "([\w-]+)"', line)
            if m:
                servers[m.group(1)] = (m.group(2), m.group(3))
                continue
            m = re.match(r'(\w+) := "([\w-]+)"$', line)
            if m:
                variables[m.group(1)] = m.group(2)
                continue
            m = re.match(r'\w+ :?= kubernetes\.GetClusterNetworkPolicy\(t, s\.Client, "([\w-]+)"', line)
            if m:
                target = ("ClusterNetworkPolicy", None, m.group(1))
                continue
            m = re.match(r'\w+ :?= kubernetes\.GetNamespace\(t, s\.Client, "([\w-]+)"', line)
            if m:
                namespace_target = m.group(1)
                continue
            if re.match(r"mutate := \w+\.DeepCopy\(\)", line):
                working = copy.deepcopy(objects[target])
                continue
            if re.match(r"mutateNamespace :?= namespace\.DeepCopy\(\)", line):
                continue
            m = re.match(r'mutateNamespace\.SetLabels\(map\[string\]string\{"([\w./-]+)": "([\w-]+)"\}\)', line)
            if m:
                relabel = {"kind": "Namespace", "name": namespace_target, "labels": {m.group(1): m.group(2)}}
                continue
            if line.startswith("kubernetes.PatchNamespace("):
                # The relabel and the probes after it are a step of their own.
                steps.append(step)
                step = {"label": [relabel], "probes": []}
                continue
            m = re.match(r"(\w+) := mutate(?:\.DeepCopy\(\))?\.Spec\.(Egress|Ingress)\[(\d+)\]$", line)
            if m:
                variables[m.group(1)] = copy.deepcopy(working["spec"][m.group(2).lower()][int(m.group(3))])
                continue
            m = re.match(r"mutate\.Spec\.(Egress|Ingress)\[(\d+)\] = mutate\.Spec\.(Egress|Ingress)\[(\d+)\]$", line)
            if m:
                rules = working["spec"][m.group(1).lower()]
                rules[int(m.group(2))] = copy.deepcopy(working["spec"][m.group(3).lower()][int(m.group(4))])
                continue
            m = re.match(r"mutate\.Spec\.(Egress|Ingress)\[(\d+)\] = (\w+)$", line)
            if m:
                working["spec"][m.group(1).lower()][int(m.group(2))] = variables[m.group(3)]
                continue
            m = re.match(r"mutate\.Spec\.(Egress|Ingress)\[(\d+)\]\.Action = api\.ClusterNetworkPolicyRuleAction(\w+)", line)
            if m:
                working["spec"][m.group(1).lower()][int(m.group(2))]["action"] = m.group(3)
                continue
            m = re.match(r"mutate\.Spec\.Priority = (\d+)", line)
            if m:
                working["spec"]["priority"] = int(m.group(1))
                continue
            m = re.match(r"(\w+)\.(?:Spec\.)?Protocols = \[\]api\.ClusterNetworkPolicyProtocol\{", line)
            if m:
                # A rule's protocols replaced by one destinationNamedPort (the experimental cases).
                body = " ".join(lines[i:i + 6])
                name = re.search(r'DestinationNamedPort:\s*(?:"([\w-]+)"|(\w+))', body)
                name = name.group(1) or variables[name.group(2)]
                variables[m.group(1)]["protocols"] = [{"destinationNamedPort": name}]
                while "}" not in lines[i] or lines[i].startswith("DestinationNamedPort"):
                    i += 1
                i += 1
                continue
            if line.startswith("var mask string") or line.startswith("if net.IsIPv4String") or line in (
                'mask = "/32"', "} else {", 'mask = "/128"', "}"):
                continue
            if line.startswith("newRule := []api.ClusterNetworkPolicyEgressRule{"):
                body = []
                while not lines[i].startswith("mutate.Spec.Egress = append(newRule"):
                    body.append(lines[i])
                    i += 1
                i += 1
                body = " ".join(body)
                name = re.search(r'Name:\s*"([\w-]+)"', body).group(1)
                action = re.search(r'Action:\s*"(\w+)"', body).group(1)
                networks = [
                    pod_ip(pods, *servers[var]) + "/32"
                    for var in re.findall(r"api\.CIDR\((\w+)\.Status\.PodIP \+ mask\)", body)
                ]
                working["spec"]["egress"].insert(0, {"name": name, "action": action, "to": [{"networks": networks}]})
                continue
            if line.startswith("kubernetes.PatchClusterNetworkPolicy(") or re.match(r"err = s\.Client\.Update\(ctx, mutate\)", line):
                objects[target] = working
                file = f"step-{len(steps) + 1}.yaml"
                files[file] = [copy.deepcopy(working)]
                step.setdefault("apply", []).append(file)
                continue
            m = re.match(r'err (?::)?= s\.Client\.Get\(ctx, client\.ObjectKey\{', line)
            if m:
                body = " ".join(lines[i:i + 3])
                namespace = re.search(r'Namespace:\s*"([\w-]+)"', body).group(1)
                name = re.search(r'Name:\s*"([\w-]+)"', body).group(1)
                target = ("NetworkPolicy", namespace, name)
                i += 3
                continue
            if re.match(r"err = s\.Client\.Delete\(ctx, np\)", line):
                kind, namespace, name = target
                step.setdefault("delete", []).append({"kind": kind, "namespace": namespace, "name": name})
                del objects[target]
                continue
            if line.startswith("kubernetes.PokeServer("):
                call = line + " " + lines[i]
                i += 1
                m = re.search(
                    r'"([\w-]+)", "([\w-]+)", "(\w+)",\s*(\w+)\.Status\.PodIP, int32\((\d+)\), s\.TimeoutConfig, (true|false)\)', call)
                if not m:
                    raise Unknown(f"{path}: {call}")
                server = servers[m.group(4)]
                step["probes"].append({
                    "from": f"{m.group(1)}/{m.group(2)}",
                    "to": f"{server[0]}/{server[1]}",
                    "port": int(m.group(5)),
                    "protocol": m.group(3).upper(),
                    "expect": "allow" if m.group(6) == "true" else "deny",
                })
                continue
            if re.match(r"(ctx, cancel :=|defer cancel\(\)|np := |require\.|\}\)|Test: func|ShortName|Description|Features|suite\.Support|Manifests|\},?$|func init|ConformanceTests|\w+ = suite\.ConformanceTest\{|\)$|CNP\w+,$)", line):
                continue
            raise Unknown(f"{path}: {line}")
        steps.append(step)
        out.append((scenario_name(short), files, [s for s in steps if s.get("probes") or s.get("apply") or s.get("delete") or s.get("label")]))
    return out


def dump(documents):
    return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in documents)


def main():
    checkout = sys.argv[1]
    objects, pods = cluster(checkout)
    header = "# The network-policy-api conformance suite's namespaces and pods (tests/tools/cnp-conformance.py).\n"
    (ROOT / CLUSTER).write_text(header + dump(objects))
    listing = subprocess.run(["git", "-C", checkout, "ls-tree", "--name-only", "HEAD", "conformance/tests/"],
                             check=True, capture_output=True, text=True).stdout.split()
    for path in sorted(p for p in listing if p.endswith(".go") and not p.endswith("main.go")):
        for name, files, steps in translate(checkout, path, pods):
            directory = ROOT / "tests/scenarios" / name
            directory.mkdir(parents=True, exist_ok=True)
            for old in directory.glob("*.yaml"):
                old.unlink()
            for file, documents in files.items():
                (directory / file).write_text(dump(documents))
            order = ("delete", "label", "apply", "probes")
            steps = [{key: step[key] for key in order if key in step} for step in steps]
            expect = {"cluster": "../../clusters/houses.yaml", "steps": steps}
            source = f"# From {path} of kubernetes-sigs/network-policy-api (tests/tools/cnp-conformance.py).\n"
            (directory / "expect.yaml").write_text(source + yaml.safe_dump(expect, sort_keys=False, width=160))
            print(f"{name}: {len(steps)} steps, {sum(len(s['probes']) for s in steps)} probes")


if __name__ == "__main__":
    main()
