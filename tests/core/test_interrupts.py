"""Signals under harness.interrupts: SIGTERM raises like Ctrl-C, training defers the first one."""

import os
import signal

import pytest

from harness import interrupts


def _kill(sig=signal.SIGTERM):
    os.kill(os.getpid(), sig)


def test_sigterm_raises_interrupted_with_its_exit_code_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(interrupts.Interrupted) as info, interrupts.installed():
        _kill()
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert "SIGTERM" in str(info.value) and "rerun" in str(info.value)
    assert isinstance(info.value, KeyboardInterrupt)  # schedulers stop as for Ctrl-C
    assert signal.getsignal(signal.SIGTERM) is before


def test_deferred_block_records_the_first_signal_and_raises_on_the_second():
    with interrupts.installed():
        with interrupts.deferred() as requested:
            assert requested() is None
            _kill()  # no exception: the training step may finish
            assert requested() == signal.SIGTERM
            with pytest.raises(interrupts.Interrupted) as info:
                _kill(signal.SIGINT)
            assert info.value.exit_code == 130
        # outside the block the request is forgotten and a signal raises again
        with pytest.raises(interrupts.Interrupted):
            _kill()


def test_deferred_without_installed_handlers_never_requests():
    with interrupts.deferred() as requested:
        assert requested() is None


def test_stopped_names_signal_step_and_how_to_resume():
    exc = interrupts.stopped(signal.SIGTERM, 3, 6)
    assert str(exc) == ("stopped by SIGTERM after training step 3 of 6 (checkpoint saved); "
                        "rerun the same command to resume")
    assert exc.exit_code == 143


def test_reinstall_takes_the_signals_back_only_while_installed():
    def other(*_):
        raise AssertionError("the library's handler ran")

    with interrupts.installed():
        signal.signal(signal.SIGTERM, other)  # what ray.init does
        interrupts.reinstall()
        with pytest.raises(interrupts.Interrupted):
            _kill()
    before = signal.getsignal(signal.SIGTERM)
    interrupts.reinstall()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_bare_keyboardinterrupt_after_our_signal_is_explained_by_it():
    with interrupts.installed():
        try:
            _kill()
        except interrupts.Interrupted:
            bare = KeyboardInterrupt()  # what Ray's wait raises after catching ours
        stop = interrupts.explain(bare)
        assert "SIGTERM" in str(stop) and stop.exit_code == 143
    plain = interrupts.explain(KeyboardInterrupt())
    assert plain.exit_code == 130 and "rerun" in str(plain)
