"""numpydoc validation of the public API's docstrings."""

import inspect

import pytest

numpydoc_validate = pytest.importorskip("numpydoc.validate")

import skpatch  # noqa: E402
import skpatch.backbones  # noqa: E402
import skpatch.cli  # noqa: E402
import skpatch.datasets  # noqa: E402
import skpatch.exceptions  # noqa: E402
import skpatch.metrics  # noqa: E402
import skpatch.model_selection  # noqa: E402
import skpatch.plotting  # noqa: E402

# Checks we do not enforce: See Also / Examples / extended summary on every
# object, named Returns entries (scikit-learn's "name : type" style), and
# object, and docstrings of methods inherited from scikit-learn.
IGNORED = {"SA01", "EX01", "ES01", "GL08", "SA04", "RT02", "RT05", "PR02", "GL02", "YD01"}


def _public_objects():
    for module in (skpatch, skpatch.metrics, skpatch.datasets, skpatch.backbones,
                   skpatch.plotting, skpatch.cli, skpatch.model_selection,
                   skpatch.exceptions):
        for name in module.__all__:
            obj = getattr(module, name)
            if not callable(obj) or isinstance(obj, type(skpatch)):
                continue
            qualname = f"{module.__name__}.{name}"
            yield qualname
            if inspect.isclass(obj):
                for method, member in vars(obj).items():
                    if not method.startswith("_") and callable(member):
                        yield f"{qualname}.{method}"


@pytest.mark.parametrize("name", sorted(set(_public_objects())))
def test_docstring(name):
    if name.endswith(("Backbone", "WeightsUnavailableError")):
        pytest.skip("dataclass / exception: fields documented in the class docstring")
    result = numpydoc_validate.validate(name)
    errors = [(code, msg) for code, msg in result["errors"] if code not in IGNORED]
    assert not errors, "\n".join(f"{code}: {msg}" for code, msg in errors)
