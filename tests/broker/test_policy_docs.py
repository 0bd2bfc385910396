"""docs/policy.md says what the policy does: every TOML block in it loads, and its examples decide as the page says."""

import re
from pathlib import Path
from typing import Dict, List

import pytest

from agenshield_shim.broker.policy import Policy, PolicyError, Target, build_policy, policy_from_mapping

try:  # tomllib on 3.11+, tomli before (as the broker reads it)
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

DOC = Path(__file__).resolve().parents[2] / "docs" / "policy.md"


def blocks() -> Dict[str, Policy]:
    """Each ```toml block of the page as a policy, keyed by its first rule's id."""
    found: Dict[str, Policy] = {}
    for text in re.findall(r"```toml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S):
        policy = policy_from_mapping(tomllib.loads(text), source="docs/policy.md")
        found[policy.rules[0].id] = policy
    return found


def tunnel(host: str, port: int) -> Target:
    return Target(host=host, port=port, tunnel=True)


def call(method: str, url_host: str, path: str, port: int = 443) -> Target:
    return Target(host=url_host, port=port, scheme="https", method=method, path=path)


def test_every_block_loads() -> None:
    assert set(blocks()) == {"github", "openai", "openai-inference", "pypi", "local-search", "no-cloud-metadata"}


@pytest.mark.parametrize("block, target, allowed", [
    ("openai", tunnel("api.openai.com", 443), True),
    ("openai", tunnel("api.anthropic.com", 443), True),
    ("openai", tunnel("api.openai.com", 80), False),
    ("openai", tunnel("example.com", 443), False),
    ("openai-inference", call("POST", "api.openai.com", "/v1/chat/completions"), True),
    ("openai-inference", call("GET", "api.openai.com", "/v1/models"), False),
    ("openai-inference", call("POST", "api.openai.com", "/v1/../admin"), False),
    ("openai-inference", tunnel("api.openai.com", 443), False),  # a paths rule never matches a tunnel
    ("pypi", tunnel("pypi.org", 443), True),
    ("pypi", tunnel("files.pythonhosted.org", 443), True),
    ("pypi", tunnel("evil.example", 443), False),
    ("local-search", tunnel("127.0.0.1", 9200), True),
    ("local-search", tunnel("::1", 9200), True),
    ("local-search", tunnel("127.0.0.1", 5432), False),
    ("no-cloud-metadata", tunnel("169.254.169.254", 80), False),
    ("no-cloud-metadata", tunnel("metadata.google.internal", 80), False),
    ("no-cloud-metadata", tunnel("example.com", 443), True),
    ("github", tunnel("api.github.com", 443), True),
    ("github", tunnel("github.com", 22), False),
])
def test_examples_decide_as_documented(block: str, target: Target, allowed: bool) -> None:
    assert blocks()[block].check(target).allowed is allowed


def test_allow_flags_as_documented() -> None:
    policy = build_policy(None, ["api.openai.com:443", "api.anthropic.com", "[::1]:8080"])
    assert [r.id for r in policy.rules] == ["allow-0", "allow-1", "allow-2"]
    assert policy.check(tunnel("api.openai.com", 443)).allowed
    assert not policy.check(tunnel("api.openai.com", 80)).allowed
    assert policy.check(tunnel("api.anthropic.com", 8443)).allowed  # no port: every port
    assert policy.check(tunnel("::1", 8080)).allowed
    assert not policy.check(tunnel("127.0.0.1", 80)).allowed  # --allow replaces the loopback default
    assert build_policy(None, []).check(tunnel("127.0.0.1", 80)).allowed


def test_allow_cannot_undo_a_deny_rule(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('default = "allow"\n[[rules]]\nid = "no-example"\naction = "deny"\nhosts = ["example.com"]\n')
    decision = build_policy(str(path), ["example.com:443"]).check(tunnel("example.com", 443))
    assert not decision.allowed and decision.policy_id == "no-example"


def test_documented_error_names_file_rule_and_field(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    lines: List[str] = []
    for rid in ("a", "b", "pypi"):
        lines += ["[[rules]]", 'id = "%s"' % rid, 'action = "allow"', 'hosts = ["pypi.org"]']
    lines.append('ports = ["https"]')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PolicyError) as info:
        build_policy(str(path), [])
    message = str(info.value)
    assert message.startswith("policy file %s, rule 2 (id 'pypi'), field 'ports': not a port: 'https'" % path)
    assert "\n" not in message
