"""`${file:/path}` in config values: read, trimmed, tracked, and never shown in an error."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.config.loader import ConfigError, load_config, validate_text
from proxy.config.secrets import FileSecrets, trim_final_newline
from proxy.config.source import parse

TOKEN = "t0ken-from-a-file-9f2c"
PASSWORD = "pg-pa55-from-a-file-41d7"


def yaml_text(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "secrets"
    directory.mkdir()
    (directory / "token").write_text(TOKEN + "\n")
    (directory / "pg-pass").write_text(PASSWORD + "\r\n")
    return directory


# ---------------------------------------------------------------------------
# reading


@pytest.mark.parametrize(
    ("content", "value"),
    [
        ("s3cret", "s3cret"),
        ("s3cret\n", "s3cret"),
        ("s3cret\r\n", "s3cret"),
        ("s3cret\n\n", "s3cret\n"),
        ("s3cret \n", "s3cret "),
    ],
)
def test_one_final_newline_is_trimmed_and_no_more(content: str, value: str) -> None:
    assert trim_final_newline(content) == value


def test_a_whole_value_is_read_from_the_file_and_trimmed(secrets_dir: Path) -> None:
    config, errors = validate_text(
        f"admin:\n  token: ${{file:{secrets_dir}/token}}\n", "f.yaml", env={}
    )

    assert errors == []
    assert config is not None
    assert config.admin.token == TOKEN


def test_a_file_is_substituted_inside_a_longer_string(secrets_dir: Path) -> None:
    config, errors = validate_text(
        f"store: redis://app:${{file:{secrets_dir}/pg-pass}}@127.0.0.1:6379/0\n", "f.yaml", env={}
    )

    assert errors == []
    assert config is not None
    assert config.store == f"redis://app:{PASSWORD}@127.0.0.1:6379/0"


def test_files_and_environment_variables_mix_in_one_value(secrets_dir: Path) -> None:
    doc = parse(
        f"store: redis://${{USER_NAME}}:${{file:{secrets_dir}/pg-pass}}@db/0\n",
        "f.yaml",
        env={"USER_NAME": "app"},
    )

    assert doc.errors == []
    assert doc.data == {"store": f"redis://app:{PASSWORD}@db/0"}


def test_the_document_records_the_values_and_the_files_read(secrets_dir: Path) -> None:
    doc = parse(
        yaml_text(
            f"""
            admin:
              token: ${{file:{secrets_dir}/token}}
            store: redis://app:${{file:{secrets_dir}/pg-pass}}@db/0
            idempotency:
              store: redis://app:${{file:{secrets_dir}/pg-pass}}@db/1
            """
        ),
        "f.yaml",
        env={},
    )

    assert {TOKEN, PASSWORD} <= doc.secrets.values
    assert set(doc.secrets.digests) == {f"{secrets_dir}/token", f"{secrets_dir}/pg-pass"}
    assert doc.secrets.redact(f"redis://app:{PASSWORD}@db/0") == "redis://app:***@db/0"


def test_the_loaded_config_carries_what_came_from_files(secrets_dir: Path) -> None:
    config, _ = validate_text(f"admin:\n  token: ${{file:{secrets_dir}/token}}\n", env={})

    assert config is not None
    assert TOKEN in config.file_secrets.values
    assert list(config.file_secrets.digests) == [f"{secrets_dir}/token"]


def test_a_config_without_files_has_no_secrets() -> None:
    config, _ = validate_text("admin:\n  token: plain\n", env={})

    assert config is not None
    assert not config.file_secrets
    assert config.file_secrets.digests == {}


def test_a_variable_whose_value_names_a_file_is_not_expanded_again(secrets_dir: Path) -> None:
    doc = parse("admin:\n  token: ${TOKEN}\n", "f.yaml", env={"TOKEN": "${file:/etc/passwd}"})

    assert doc.data == {"admin": {"token": "${file:/etc/passwd}"}}
    assert doc.secrets.digests == {}


def test_a_file_is_never_expanded_in_keys(secrets_dir: Path) -> None:
    doc = parse(f"${{file:{secrets_dir}/token}}: 1\n", "f.yaml", env={})

    assert doc.data == {f"${{file:{secrets_dir}/token}}": 1}


def test_a_secret_that_looks_like_yaml_or_a_variable_stays_text(tmp_path: Path) -> None:
    (tmp_path / "odd").write_text("{a: 1} ${HOME}\n")

    doc = parse(f"admin:\n  token: ${{file:{tmp_path}/odd}}\n", "f.yaml", env={"HOME": "/root"})

    assert doc.data == {"admin": {"token": "{a: 1} ${HOME}"}}


# ---------------------------------------------------------------------------
# errors: the key, the line and the file, never the content


def test_a_missing_file_names_the_key_line_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "token"
    text = yaml_text(
        f"""
        listen: 127.0.0.1:8080
        admin:
          token: ${{file:{missing}}}
        """
    )

    config, errors = validate_text(text, "f.yaml", env={})

    assert config is None
    assert [str(e) for e in errors] == [
        f"f.yaml:3 admin.token: cannot read secret file {missing}: No such file or directory"
    ]


def test_an_unreadable_file_is_an_error_that_does_not_show_its_content(tmp_path: Path) -> None:
    directory = tmp_path / "a-directory"
    directory.mkdir()

    _, errors = validate_text(f"admin:\n  token: ${{file:{directory}}}\n", "f.yaml", env={})

    assert len(errors) == 1
    assert errors[0].path == "admin.token"
    assert f"cannot read secret file {directory}:" in errors[0].message


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"", "is empty"), (b"\n", "is empty"), (b"\xff\xfe s3cret-bytes", "is not UTF-8 text")],
)
def test_an_empty_or_binary_file_is_refused(tmp_path: Path, content: bytes, problem: str) -> None:
    (tmp_path / "token").write_bytes(content)

    _, errors = validate_text(f"admin:\n  token: ${{file:{tmp_path}/token}}\n", "f.yaml", env={})

    assert [str(e) for e in errors] == [
        f"f.yaml:2 admin.token: secret file {tmp_path}/token {problem}"
    ]
    assert "s3cret-bytes" not in str(errors)


def test_a_relative_file_path_is_refused() -> None:
    _, errors = validate_text("admin:\n  token: ${file:secrets/token}\n", "f.yaml", env={})

    assert [str(e) for e in errors] == [
        "f.yaml:2 admin.token: secret file 'secrets/token' must be an absolute path"
    ]


def test_load_config_raises_naming_the_file_and_remembers_it_for_the_reloader(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(f"admin:\n  token: ${{file:{tmp_path}/token}}\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})

    assert f"{path}:2 admin.token: cannot read secret file {tmp_path}/token" in str(caught.value)
    assert caught.value.secrets.digests == {f"{tmp_path}/token": None}


@pytest.mark.parametrize(
    ("key", "yaml_path"),
    [
        # a validator quoting the value: '...' is not a duration
        ("shutdown.grace", "shutdown:\n  grace: {}\n"),
        # pydantic echoing the input: '...': Input should be a valid integer
        ("queue.concurrency", "queue:\n  concurrency: {}\n"),
        # a listen address quoting it
        ("listen", "listen: {}\n"),
    ],
)
def test_a_validation_error_about_a_file_value_does_not_show_it(
    tmp_path: Path, key: str, yaml_path: str
) -> None:
    secret = "not-a-valid-value-7c1e'\\x"
    (tmp_path / "value").write_text(secret + "\n")

    _, errors = validate_text(yaml_path.format(f"${{file:{tmp_path}/value}}"), "f.yaml", env={})

    assert [e.path for e in errors] == [key]
    assert "not-a-valid-value" not in str(errors[0])
    assert "***" in errors[0].message


def test_a_secret_inside_a_refused_url_is_not_shown(tmp_path: Path) -> None:
    (tmp_path / "pass").write_text("url-pa55-3b9a\n")

    _, errors = validate_text(
        f"upstreams:\n  pay:\n    url: ftp://svc:${{file:{tmp_path}/pass}}@pay\n", "f.yaml", env={}
    )

    assert [e.path for e in errors] == ["upstreams.pay.url"]
    assert "url-pa55-3b9a" not in str(errors[0])


# ---------------------------------------------------------------------------
# redaction


def test_redaction_hides_a_secret_as_written_and_in_its_url_forms() -> None:
    secrets = FileSecrets.of(["p@ss/w0rd"], {})

    assert secrets.redact("p@ss/w0rd") == "***"
    assert secrets.redact("redis://app:p%40ss%2Fw0rd@db") == "redis://app:***@db"
    assert secrets.redact("nothing here") == "nothing here"


def test_redaction_hides_a_longer_secret_whole_when_it_contains_a_shorter_one() -> None:
    secrets = FileSecrets.of(["abc", "abcdef-123"], {})

    assert secrets.redact("x abcdef-123 y") == "x *** y"
