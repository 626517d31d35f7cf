"""gspn_propagate's input checks (CPU)."""

import pytest
import torch

from gspn_diffusers import gspn_propagate


def test_a_non_tensor_input_is_a_value_error_naming_it():
    gates, lam = torch.zeros(1, 4, 3, 1, 2, 2), torch.ones(1, 4, 2, 2, 2)
    with pytest.raises(ValueError, match=r"x must be a tensor, not list .*got x list, gates \(1, 4, 3, 1, 2, 2\)"):
        gspn_propagate([[1.0]], gates, lam)
