"""Ctrl-C anywhere in a command: one line and exit status 130 (review helper-150)."""

from __future__ import annotations

import builtins
import sys

import pytest

from innfer import cli


def test_an_interrupt_while_the_parser_is_built_is_one_line(monkeypatch, capsys):
    # build_parser imports the backends (and numpy): a Ctrl-C in a command's first ~0.2 s
    # printed a 31-line traceback.
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    try:
        code = cli.main(["serve", "--repository", "x"])
    except KeyboardInterrupt:  # (escaping, it would end the whole test session)
        pytest.fail("the interrupt escaped main: the user saw its traceback")
    assert code == 130
    assert capsys.readouterr().err == "innfer: interrupted\n"


def test_an_interrupt_while_onnxruntime_loads_is_not_a_missing_backend(monkeypatch):
    # pybind11 turns a KeyboardInterrupt in an extension's initialisation into an
    # ImportError: the command said "the onnxruntime backend is not installed", exit 2.
    from runtime.engines.onnxruntime import OnnxRuntimeBackend

    real = builtins.__import__

    def importing(name, *args, **kwargs):
        if name == "onnxruntime":
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise ImportError("initialization of onnxruntime_pybind11_state raised") from None
        return real(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr(builtins, "__import__", importing)
    with pytest.raises(KeyboardInterrupt):
        OnnxRuntimeBackend().available()


def test_a_backend_that_is_not_there_is_still_said_unavailable(monkeypatch):
    from runtime.engines.onnxruntime import OnnxRuntimeBackend

    real = builtins.__import__

    def importing(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr(builtins, "__import__", importing)
    assert OnnxRuntimeBackend().available() is False


@pytest.mark.parametrize("module", ["torch", "tensorrt"])
def test_an_interrupt_while_another_backend_loads_is_not_a_missing_one(module, monkeypatch):
    # The same for the other compiled backends (review helper-152): torch was said
    # unavailable, TensorRT "needs the tensorrt package".
    from runtime.engines.tensorrt import TensorRTBackend
    from runtime.engines.torch import TorchBackend

    real = builtins.__import__

    def importing(name, *args, **kwargs):
        if name == module:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise ImportError(f"initialization of {module} raised") from None
        return real(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setattr(builtins, "__import__", importing)
    backend = TorchBackend() if module == "torch" else TensorRTBackend()
    with pytest.raises(KeyboardInterrupt):
        backend.available()


@pytest.mark.parametrize("raised, said", [(KeyboardInterrupt, "interrupted"),
                                          (ValueError, "error: bad")])  # fmt: skip
def test_the_message_is_not_glued_to_an_open_progress_bar(monkeypatch, capsys, raised, said):
    # "innfer train: interrupted" was printed onto the training bar's own line: the bar
    # (tqdm(total=...), as training's: the traceback holds it open) wrote no newline.
    from tqdm.auto import tqdm

    def train(args):
        bar = tqdm(total=10, desc="train", file=sys.stderr)
        bar.update(1)
        raise raised("bad")

    args = cli.build_parser().parse_args(["inspect", "x"])
    monkeypatch.setattr(cli, "_parse", lambda argv: args)
    args.func = train
    try:
        code = cli.main([])
    except KeyboardInterrupt:  # (escaping, it would end the whole test session)
        pytest.fail("the interrupt escaped main")
    assert code == (130 if raised is KeyboardInterrupt else 2)
    err = capsys.readouterr().err
    assert "train:" in err  # the bar was drawn
    assert f"\ninnfer inspect: {said}\n" in err


def test_a_sigterm_to_long_work_says_what_ctrl_c_says(monkeypatch, capsys):
    # A job's or a container's stop (SIGTERM) ended train / calibrate without a word of
    # what was saved or how to go on, where Ctrl-C said both (review helper-272).
    import os
    import signal

    def calibrate(args):
        os.kill(os.getpid(), signal.SIGTERM)  # (delivered to the main thread, here)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
        pytest.fail("SIGTERM did not interrupt the command")

    args = cli.build_parser().parse_args(["calibrate", "x", "--data", "digits"])
    monkeypatch.setattr(cli, "_parse", lambda argv: args)
    args.func = calibrate
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = cli.main([])
    except KeyboardInterrupt:
        pytest.fail("the SIGTERM escaped main")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 128 + signal.SIGTERM
    assert "innfer calibrate: terminated (SIGTERM)" in capsys.readouterr().err


def test_a_command_whose_extra_is_not_installed_names_the_extra(tmp_path):
    # The torch-free install (pip install innfer): inspect, build, report, calibrate, train
    # said "internal error: ModuleNotFoundError: No module named 'torch' (a bug: please
    # report it)" (review helper-299). torch is hidden from a child interpreter.
    import subprocess

    code = ("import sys; sys.modules['torch'] = None; from innfer.cli import main; "
            f"sys.exit(main(['inspect', {str(tmp_path)!r}]))")  # fmt: skip
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert ran.returncode == 2, ran.stderr
    assert "needs the 'build' extra: pip install 'innfer[build]'" in ran.stderr
    assert "internal error" not in ran.stderr
