"""Package-level checks: the import is light and the console script dispatches."""

import subprocess
import sys


def test_import_does_not_import_torch_or_transformers():
    code = (
        "import sys, gpg_vlm, gpg_vlm.cli, gpg_vlm.models, gpg_vlm.models.family; "
        "bad = [m for m in ('transformers', 'torch') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cli_help_lists_commands():
    from gpg_vlm.cli import main

    assert main(["--help"]) == 0


def test_cli_unknown_command_is_an_error(capsys):
    from gpg_vlm.cli import main

    assert main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err
