"""certd.config: defaults, every kind of bad value with its line and key, the shipped example
and docs, --check-config, and a fuzz test that parse() only ever raises ConfigError."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certd import config
from certd.abi import wire
from certd.config import Config, ConfigError, parse

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "contrib" / "certd.toml.example"
DOCS = ROOT / "docs" / "configuration.md"


def err(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        parse(textwrap.dedent(text), "certd.toml")
    return e.value


def keys_of(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if "check" in f.metadata]


ALL_KEYS = [(section, key) for section, (_, cls) in config._SECTIONS.items()
            for key in keys_of(cls)] + [("profile", k) for k in keys_of(config.Profile)]


# -- defaults ------------------------------------------------------------------------------------


def test_every_default():
    c = parse("", "empty.toml")
    assert c == Config(source="empty.toml")
    s = c.server
    assert s.socket == Path("/run/certd/certd.sock")
    assert s.socket_mode == 0o660
    assert s.socket_group == "" and s.socket_gid is None
    assert s.request_deadline_ms == 100 and s.request_deadline == 0.1
    assert s.lease_timeout_ms == 2000 and s.lease_timeout == 2.0
    assert s.idle_timeout_s == 300
    assert s.max_frame == 1024 == wire.MAX_REQUEST_FRAME
    assert s.max_leases_per_connection == 16
    assert s.max_connections == 1024
    assert s.rate_per_vm == 50 and s.rate_burst == 100
    a = c.access
    assert a.allow_uids == (0,) and a.allow_gids == () and a.allow_users == () \
        and a.allow_groups == ()
    assert a.uids == {0} and a.gids == frozenset()
    assert c.store.blob == Path("/var/lib/certd/certs.blob")
    assert c.platform.source == "auto" and c.platform.file is None
    k = c.kds
    assert k.base_url == "https://kdsintf.amd.com" and k.mirrors == ()
    assert k.urls == ("https://kdsintf.amd.com",)
    assert k.cache_dir == Path("/var/cache/certd/kds")
    assert (k.timeout_s, k.min_backoff_s, k.max_backoff_s) == (10, 10, 300)
    assert c.watch.drop_dir is None
    assert (c.log.level, c.log.format) == ("info", "auto")
    assert c.profiles == ()
    assert c.blob_for("any-vm") == c.store.blob
    assert c.blobs == (c.store.blob,)


def test_every_key_set():
    c = parse(textwrap.dedent("""
        [server]
        socket = "/run/c/s.sock"
        socket_mode = "600"
        socket_group = "root"
        request_deadline_ms = 250
        lease_timeout_ms = 5000
        idle_timeout_s = 1.5
        max_frame = 96
        max_leases_per_connection = 1
        max_connections = 8
        rate_per_vm = 0.5
        rate_burst = 2
        [access]
        allow_uids = [0, 107]
        allow_gids = [64055]
        allow_users = ["root"]
        allow_groups = ["root"]
        [store]
        blob = "/srv/certs.blob"
        [platform]
        source = "file"
        file = "/etc/certd/platform.toml"
        [kds]
        base_url = "https://kds.example.com/"
        mirrors = ["http://10.0.0.1:8080/kds"]
        cache_dir = "/srv/cache"
        timeout_s = 2
        min_backoff_s = 1
        max_backoff_s = 1
        [watch]
        drop_dir = "/var/lib/certd/drop"
        [log]
        level = "DEBUG"
        format = "json"
        [[profile]]
        name = "vlek"
        blob = "/var/lib/certd/vlek.blob"
        vms = ["tenant-a-*", "special"]
        [[profile]]
        name = "second"
        blob = "/var/lib/certd/second.blob"
        vms = ["tenant-*"]
    """))
    assert c.server.socket_mode == 0o600 and c.server.socket_gid == 0
    assert c.server.idle_timeout_s == 1.5 and c.server.rate_per_vm == 0.5
    assert c.access.uids == {0, 107} and c.access.gids == {0, 64055}
    assert c.access.allows(107) and c.access.allows(5000, {64055}) and not c.access.allows(5000)
    assert c.platform.file == Path("/etc/certd/platform.toml")
    assert c.kds.base_url == "https://kds.example.com"        # trailing slash dropped
    assert c.kds.urls == ("http://10.0.0.1:8080/kds", "https://kds.example.com")
    assert c.watch.drop_dir == Path("/var/lib/certd/drop")
    assert c.log.level == "debug"
    assert [p.name for p in c.profiles] == ["vlek", "second"]
    # First matching profile in file order wins.
    assert c.profile_for("tenant-a-1").name == "vlek"
    assert c.profile_for("tenant-b-1").name == "second"
    assert c.blob_for("special") == Path("/var/lib/certd/vlek.blob")
    assert c.blob_for("other") == Path("/srv/certs.blob")
    assert c.profile_for("special-not") is None


def test_kds_can_be_disabled():
    c = parse('[kds]\nbase_url = ""\n')
    assert c.kds.urls == ()


def test_config_is_frozen():
    c = parse("")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.server.max_frame = 1  # type: ignore[misc]


# -- errors: line, key, message ----------------------------------------------------------------


@pytest.mark.parametrize("text, line, key, message", [
    # wrong types
    ('[server]\nrequest_deadline_ms = "100"\n', 2, "server.request_deadline_ms", "integer"),
    ("[server]\nmax_frame = 1024.0\n", 2, "server.max_frame", "integer"),
    ("[server]\nmax_connections = true\n", 2, "server.max_connections", "integer"),
    ("[server]\nidle_timeout_s = true\n", 2, "server.idle_timeout_s", "number"),
    ("[server]\nrate_per_vm = nan\n", 2, "server.rate_per_vm", "greater than 0"),
    ("[server]\nsocket = 5\n", 2, "server.socket", "string"),
    ("[access]\nallow_uids = 0\n", 2, "access.allow_uids", "array"),
    ('[access]\nallow_uids = ["root"]\n', 2, "access.allow_uids", "item 0"),
    ("[log]\nlevel = 3\n", 2, "log.level", "string"),
    ("server = 1\n", 1, "server", "must be a table"),
    ("profile = 1\n", 1, "profile", "[[profile]]"),
    ("[profile]\nname = 'x'\n", 1, "profile", "[[profile]]"),
    # bad values
    ("[server]\nrequest_deadline_ms = 0\n", 2, "server.request_deadline_ms", "between 1"),
    ("[server]\nmax_frame = 95\n", 2, "server.max_frame", "between 96 and 1024"),
    ("[server]\nmax_frame = 1025\n", 2, "server.max_frame", "between 96 and 1024"),
    ("[server]\nmax_frame = 65536\n", 2, "server.max_frame", "between 96 and 1024"),
    ("[server]\nrate_burst = -1\n", 2, "server.rate_burst", "between 1"),
    ("[server]\nidle_timeout_s = 0\n", 2, "server.idle_timeout_s", "greater than 0"),
    ("[server]\nsocket = '/" + "x" * 120 + "'\n", 2, "server.socket", "at most 107"),
    ('[server]\nsocket_group = "no-such-group-xyz"\n', 2, "server.socket_group", "no such group"),
    ('[access]\nallow_users = ["root", "no-such-user-xyz"]\n', 2, "access.allow_users",
     "no such user 'no-such-user-xyz'"),
    ('[access]\nallow_groups = ["no-such-group-xyz"]\n', 2, "access.allow_groups", "no such group"),
    ("[access]\nallow_uids = []\n", 1, "access", "allows nobody"),
    ("[access]\nallow_uids = [4294967295]\n", 2, "access.allow_uids", "between 0"),
    ('[platform]\nsource = "tpm"\n', 2, "platform.source", "'auto', 'sev', 'file'"),
    ('[platform]\nsource = "file"\n', 1, "platform.file", 'platform.source = "file"'),
    ('[kds]\nbase_url = "ftp://x"\n', 2, "kds.base_url", "http:// or https://"),
    ('[kds]\nmirrors = ["https://a?b=1"]\n', 2, "kds.mirrors", "without query"),
    ("[kds]\nmin_backoff_s = 60\nmax_backoff_s = 30\n", 3, "kds.max_backoff_s",
     "at least min_backoff_s (60)"),
    ('[log]\nlevel = "verbose"\n', 2, "log.level", "debug, info"),
    ('[log]\nformat = "xml"\n', 2, "log.format", "'auto', 'json', 'console'"),
    # relative paths
    ('[store]\nblob = "certs.blob"\n', 2, "store.blob", "absolute path"),
    ('[kds]\ncache_dir = "./cache"\n', 2, "kds.cache_dir", "absolute path"),
    ('[watch]\ndrop_dir = "drop"\n', 2, "watch.drop_dir", "absolute path"),
    ('[platform]\nfile = "p.toml"\n', 2, "platform.file", "absolute path"),
    ('[server]\nsocket = "certd.sock"\n', 2, "server.socket", "absolute path"),
    ('[store]\nblob = ""\n', 2, "store.blob", "must not be empty"),
    # unknown keys and sections (typos)
    ('[server]\n\nsocket_mdoe = "0660"\n', 3, "server.socket_mdoe", "did you mean 'socket_mode'"),
    ("[logs]\nlevel = 'info'\n", 1, "logs", "did you mean [log]"),
    ("top = 1\n", 1, "top", "unknown section"),
    ('[server.socket_mode]\n', 1, "server.socket_mode", "must be a string, got table"),
    ('[kds]\nretries = 3\n', 2, "kds.retries", "unknown key; known: base_url"),
])
def test_problem_names_line_and_key(text, line, key, message):
    e = err(text)
    assert len(e.problems) == 1, str(e)
    p = e.problems[0]
    assert (p.line, p.key) == (line, key), str(e)
    assert message in p.message, str(e)
    assert str(e) == f"certd.toml:{line}: {key}: {p.message}"


@pytest.mark.parametrize("mode", ["0860", "660x", "0o660", "06600", "", "0400", "0066"])
def test_bad_socket_mode(mode):
    e = err(f'[server]\nsocket_mode = "{mode}"\n')
    assert (e.line, e.key) == (2, "server.socket_mode"), str(e)


def test_socket_mode_as_toml_integer_is_refused():
    # `socket_mode = 0o660` is 432 to tomllib: indistinguishable from a decimal mistake.
    e = err("[server]\nsocket_mode = 0o660\n")
    assert (e.line, e.key) == (2, "server.socket_mode") and "octal mode string" in str(e)


def test_duplicate_profile_names_and_blobs():
    e = err("""\
        [[profile]]
        name = "vlek"
        blob = "/var/lib/certd/a.blob"
        vms = ["a-*"]

        [[profile]]
        name = "vlek"
        blob = "/var/lib/certd/a.blob"
        vms = ["b-*"]

        [[profile]]
        name = "default-again"
        blob = "/var/lib/certd/certs.blob"
        vms = ["c-*"]
    """)
    got = [(p.line, p.key) for p in e.problems]
    assert got == [(7, "profile[2].name"), (8, "profile[2].blob"), (13, "profile[3].blob")]
    assert "duplicate profile name 'vlek' (first used by profile[1])" in e.problems[0].message
    assert "already used by profile 'vlek'" in e.problems[1].message
    assert "already used by store.blob" in e.problems[2].message


def test_profile_problems():
    e = err("""\
        [[profile]]
        name = "ok"
        blob = "relative.blob"
        vms = []
        extra = 1

        [[profile]]
        blob = "/var/lib/certd/x.blob"
        vms = ["has space"]
        [[profile]]
        name = "bad name!"
        blob = "/var/lib/certd/y.blob"
        vms = "x-*"
    """)
    got = [(p.line, p.key) for p in e.problems]
    assert got == [(3, "profile[1].blob"), (4, "profile[1].vms"), (5, "profile[1].extra"),
                   (7, "profile[2]"), (9, "profile[2].vms"), (11, "profile[3].name"),
                   (13, "profile[3].vms")], str(e)
    assert "missing required key 'name'" in e.problems[3].message


def test_all_problems_are_reported_in_line_order():
    e = err("""\
        [log]
        level = "loud"
        [server]
        max_frame = 1
        rate_burst = 0
    """)
    assert [(p.line, p.key) for p in e.problems] == [
        (2, "log.level"), (4, "server.max_frame"), (5, "server.rate_burst")]
    assert (e.line, e.key) == (2, "log.level")
    assert str(e).count("\n") == 2


@pytest.mark.parametrize("text, line", [
    ("[server]\nsocket = \n", 2),
    ("[server\n", 1),
    ("[server]\nsocket_mode = 0660\n", 2),             # leading zeros are not TOML
    ("a = 1\n\n\nb = [1,\n", 4),                       # "at end of document"
    ("[log]\n[log]\n", 2),                             # a table defined twice
    ('[server]\nsocket = "/a"\nsocket = "/b"\n', 3),   # a key defined twice
])
def test_syntax_errors_name_the_line(text, line):
    e = err(text)
    assert e.line == line, str(e)
    assert "TOML syntax error" in str(e)
    assert str(e).startswith(f"certd.toml:{line}: ")


def test_lines_with_dotted_keys_inline_tables_and_multiline_strings():
    e = err('''\
        # a comment line [server]
        [server]
        note_is_not_a_key = """
        [log]
        level = 1
        """
        [kds]
        "timeout_s" = "ten"
        log.level = 5
    ''')
    assert [(p.line, p.key) for p in e.problems] == [
        (3, "server.note_is_not_a_key"), (8, "kds.timeout_s"), (9, "kds.log")]
    e = err("server = { max_frame = 1 }\n")
    assert (e.line, e.key) == (1, "server.max_frame")


def test_lines_for_array_of_tables_after_other_tables():
    e = err("""\
        [[profile]]
        name = "a"
        blob = "/x/a"
        vms = ["a"]
        [server]
        max_frame = 1024
        [[profile]]
        name = "b"
        blob = "/x/b"
        vms = [1]
    """)
    assert [(p.line, p.key) for p in e.problems] == [(10, "profile[2].vms")]


# -- load and check_main -----------------------------------------------------------------------


def test_load_reads_a_file(tmp_path):
    p = tmp_path / "certd.toml"
    p.write_text('[log]\nlevel = "debug"\n')
    c = config.load(p)
    assert c.log.level == "debug" and c.source == str(p)


def test_load_missing_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load(tmp_path / "nope.toml")
    assert "nope.toml: cannot read: No such file or directory" in str(e.value)


def test_load_invalid_utf8(tmp_path):
    p = tmp_path / "certd.toml"
    p.write_bytes(b"[log]\nlevel = \"\xff\"\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert e.value.line == 2 and "UTF-8" in str(e.value)


def test_check_main(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text("[server]\nmax_connections = 10\n")
    assert config.check_main(good) == 0
    assert "OK" in capsys.readouterr().out

    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nmax_connections = 10\nsocket_mode = \"0999\"\n")
    assert config.check_main(bad) == 78
    out = capsys.readouterr()
    assert f"{bad}:3: server.socket_mode:" in out.err
    assert out.out == ""


# -- shipped example and docs stay in step with the code -----------------------------------------


def test_example_parses_to_the_defaults():
    c = config.load(EXAMPLE)
    assert c == Config(source=str(EXAMPLE)), "the example shows every key with its default"
    text = EXAMPLE.read_text()
    for section, key in ALL_KEYS:
        assert re.search(rf"^#? ?{key} = ", text, re.M), f"example lacks {section}.{key}"


def test_example_profile_block_parses():
    text = EXAMPLE.read_text()
    begin = text.index("# --- profile example begin")
    end = text.index("# --- profile example end")
    block = "\n".join(line.removeprefix("# ") for line in text[begin:end].splitlines()[1:])
    c = parse(text[:begin] + block + "\n")
    assert c.profile_for("tenant-a-7").name == "vlek"


def test_docs_cover_every_key_with_its_default():
    docs = DOCS.read_text()
    defaults = Config()
    for section, key in ALL_KEYS:
        assert f"`{section}.{key}`" in docs, f"docs/configuration.md lacks {section}.{key}"
        if section == "profile":
            continue
        value = getattr(getattr(defaults, section), key)
        row = next(line for line in docs.splitlines() if line.startswith(f"| `{section}.{key}`"))
        shown = {type(Path("/")): lambda v: f'"{v}"', type(None): lambda v: '""',
                 int: lambda v: str(v), float: lambda v: f"{v:g}",
                 str: lambda v: f'"{v}"', tuple: lambda v: json.dumps(list(v))}
        want = '"0660"' if key == "socket_mode" else shown[type(value)](value)
        assert f"`{want}`" in row, f"{section}.{key}: default {want} not in row: {row}"


# -- fuzz ------------------------------------------------------------------------------------


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) \
            else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)     # JSON string escapes are valid TOML basic-string escapes
    return "[" + ", ".join(toml_value(x) for x in v) + "]"


KNOWN = {section: keys_of(cls) for section, (_, cls) in config._SECTIONS.items()}
scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(),
                    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]),
                            max_size=130),
                    st.sampled_from(["/abs/path", "rel", "", "0660", "root", "auto", "file",
                                     "https://x.example", "debug", "json"]))
values = st.one_of(scalars, st.lists(scalars, max_size=4))
sections = st.sampled_from(list(KNOWN) + ["profile", "nope"])


@st.composite
def configs(draw):
    out = []
    for _ in range(draw(st.integers(0, 5))):
        section = draw(sections)
        header = "[[profile]]" if section == "profile" and draw(st.booleans()) else f"[{section}]"
        out.append(header)
        known = KNOWN.get(section, keys_of(config.Profile))
        for _ in range(draw(st.integers(0, 5))):
            key = draw(st.one_of(st.sampled_from(known), st.from_regex(r"[a-z_]{1,12}",
                                                                       fullmatch=True)))
            out.append(f"{key} = {toml_value(draw(values))}")
    return "\n".join(out) + "\n"


def check_only_config_errors(text: str) -> None:
    try:
        c = parse(text, "fuzz.toml")
    except ConfigError as e:
        n = max(1, len(text.splitlines()))
        assert e.problems
        for p in e.problems:
            assert p.line is not None and 1 <= p.line <= n + 1, (p, n)
    else:
        assert isinstance(c, Config)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_fuzz_random_text_raises_only_config_error(text):
    check_only_config_errors(text)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_fuzz_structured_toml_raises_only_config_error(text):
    check_only_config_errors(text)


def test_deeply_nested_array_is_a_config_error():
    check_only_config_errors("a = " + "[" * 100_000)


@pytest.mark.parametrize("text", ["a = '\ud800'\n", '"k\\u00e9\ud800" = 1\n',
                                  'x = 1\n"\\\\" = \ud800', "\x00", "[[profile]]\n" * 3])
def test_odd_text_is_a_config_error(text):
    check_only_config_errors(text)
