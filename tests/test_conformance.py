"""The transport conformance suite (sidecar_core.testing.conformance) against the built-in transports.

Third-party transports run the same suite from their own test folders (the example plugin's
``tests/plugins/sidecar-example-transport/tests`` does), so this module covers only the transports
this distribution ships; ``SIDECAR_TEST_TRANSPORTS`` narrows it further.
"""

import pytest

from sidecar_core import Codec, get_registry
from sidecar_core.testing import BUILTIN_TRANSPORTS, PAYLOADS, TransportConformance, payload


class TestBuiltinTransports(TransportConformance):
    sidecar_transports = BUILTIN_TRANSPORTS


def test_payloads_cover_every_builtin_serializer() -> None:
    codec = Codec(get_registry().load_serializers())
    used = {codec.encode(payload(name))[0] for name in PAYLOADS}
    assert {"tensor", "chunked_tensor", "primitives", "json"} <= used, f"payloads only reach {sorted(used)}"


# -- the pytest plugin itself (run in an inner pytest with pytester) ----------------------------

STRICT_MODULE = """
import pytest

@pytest.mark.parametrize("sidecar_transport", ["localhost", "example-tcp"])
def test_param(sidecar_transport):
    pytest.skip("not here")

@pytest.mark.transport("ucx")
def test_marked():
    pytest.skip("ucxx missing")

@pytest.mark.gpu
@pytest.mark.parametrize("sidecar_transport", ["ucx"])
def test_gpu(sidecar_transport):
    pass

@pytest.mark.gpu
@pytest.mark.parametrize("sidecar_transport", ["ucx"])
def test_gpu_other_reason(sidecar_transport):
    pytest.skip("something else")

@pytest.mark.skip(reason="nothing to do with transports")
def test_plain():
    pass

@pytest.mark.xfail(reason="known", strict=True)
@pytest.mark.parametrize("sidecar_transport", ["mock-file"])
def test_xfail(sidecar_transport):
    assert False
"""


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_strict_switch(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, strict: bool) -> None:
    monkeypatch.setenv("SIDECAR_TEST_STRICT", "1" if strict else "0")
    pytester.makepyfile(test_strict=STRICT_MODULE)
    result = pytester.runpytest("-p", "sidecar_core.testing", "-rfs", "-vv")
    if _cuda():  # test_gpu runs; test_gpu_other_reason is a skip of a built-in transport
        outcomes = {"failed": 3, "skipped": 2, "passed": 1} if strict else {"skipped": 5, "passed": 1}
    else:  # both gpu tests are skipped for lack of a CUDA device, which strict mode exempts
        outcomes = {"failed": 2, "skipped": 4} if strict else {"skipped": 6}
        result.stdout.fnmatch_lines(
            ["*::test_gpu[[]ucx[]] SKIPPED (no CUDA device)*", "*::test_gpu_other_reason[[]ucx[]] SKIPPED (no CUDA*"]
        )
    result.assert_outcomes(**outcomes, xfailed=1)
    if strict:
        result.stdout.fnmatch_lines_random(
            ["FAILED test_strict.py::test_param[[]localhost[]]*", "FAILED test_strict.py::test_marked*"]
        )
        out = result.stdout.str()
        assert "SIDECAR_TEST_STRICT=1: this test of the built-in transport 'localhost' was skipped (Skipped: not" in out
        assert "FAILED test_strict.py::test_param[example-tcp]" not in out  # third-party transports may skip


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_strict_switch_fails_a_module_skipped_whole_but_not_a_host_capability(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, strict: bool
) -> None:
    monkeypatch.setenv("SIDECAR_TEST_STRICT", "1" if strict else "0")
    pytester.makepyfile(
        test_library="""
        import pytest
        pytest.importorskip("no_such_transport_library", reason="the library is not installed")
        pytestmark = pytest.mark.transport("ucx")

        def test_hidden():
            pass
        """,
        test_host="""
        import pytest

        @pytest.mark.host_capability
        @pytest.mark.transport("ucx")
        def test_needs_root():
            pytest.skip("making network namespaces needs root")
        """,
    )
    result = pytester.runpytest("-p", "sidecar_core.testing", "-rfEs", "--continue-on-collection-errors")
    out = result.stdout.str()
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_host.py:*: making network namespaces needs root"])
    if strict:
        result.assert_outcomes(skipped=1, errors=1)
        assert "SIDECAR_TEST_STRICT=1: the module test_library.py was skipped whole (" in out
        assert "the library is not installed" in out
    else:
        result.assert_outcomes(skipped=2)


def test_conformance_class_without_the_plugin_says_how_to_enable_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_suite="""
        from sidecar_core.testing import TransportConformance

        class TestMine(TransportConformance):
            sidecar_transports = ("example-tcp",)
        """
    )
    result = pytester.runpytest()
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*TransportConformance needs the sidecar_core.testing pytest plugin*"])


SELECTION_MODULE = """
import pytest

def test_all(sidecar_transport):
    assert isinstance(sidecar_transport, str)

@pytest.mark.sidecar_needs_peer
def test_live(sidecar_transport):
    pass

class TestOnlyMock:
    sidecar_transports = ("mock-file",)

    @pytest.mark.sidecar_needs_peer
    def test_live(self, sidecar_transport):
        pass

    def test_stored(self, sidecar_transport):
        assert sidecar_transport == "mock-file"
"""


def test_transport_selection(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIDECAR_TEST_TRANSPORTS", raising=False)
    pytester.makepyfile(test_selection=SELECTION_MODULE)
    installed = list(get_registry().transports)
    result = pytester.runpytest("-p", "sidecar_core.testing", "--collect-only", "-q")
    collected = {line for line in result.outlines if line.startswith("test_selection.py::")}
    expected = {f"test_selection.py::test_all[{name}]" for name in installed}
    expected |= {f"test_selection.py::test_live[{name}]" for name in installed if name != "mock-file"}
    expected |= {
        "test_selection.py::TestOnlyMock::test_live[none]",
        "test_selection.py::TestOnlyMock::test_stored[mock-file]",
    }
    assert collected == expected

    result = pytester.runpytest("-p", "sidecar_core.testing", "--sidecar-transports", "example-tcp,mock-file", "-rs")
    result.assert_outcomes(passed=4, skipped=1)
    result.stdout.fnmatch_lines(["*needs a live peer, and the selected transports (mock-file) are peerless*"])

    monkeypatch.setenv("SIDECAR_TEST_TRANSPORTS", "example-tcp")
    result = pytester.runpytest("-p", "sidecar_core.testing", "-rs")
    result.assert_outcomes(passed=2, skipped=2)
    result.stdout.fnmatch_lines(
        ["*no transport to run against: selected [[]'example-tcp'[]], restricted to ('mock-file',)*"]
    )

    result = pytester.runpytest("-p", "sidecar_core.testing", "--sidecar-transports", "no-such,example-tcp")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*names transports that are not installed: no-such; installed: *"])


def test_report_header_lists_transports(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_TEST_STRICT", "1")
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = pytester.runpytest("-p", "sidecar_core.testing")
    result.stdout.fnmatch_lines(["sidecar transports: localhost*mock-file*", "sidecar strict mode*"])
