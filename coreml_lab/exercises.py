"""Exercise feedback for the workshop notebooks: the one ``check`` every exercise's check cell calls."""

from __future__ import annotations


def check(ok, hint: str) -> None:
    """Print the verdict on a prediction: ``ok`` None (no prediction made yet), True or False.

    Prints, never raises, so a notebook with unanswered exercises still runs unattended
    (``make report``, the notebook tests).
    """
    if ok is None:
        print("-> make your prediction in the cell above, then run both cells again")
    else:
        print("correct!" if ok else f"not quite: {hint}")
