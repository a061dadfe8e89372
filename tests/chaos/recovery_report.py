"""What each chaos case reports: how long its recovery took and how many steps it cost.
`bench/chaos.py` runs the cases with CHAINRULE_CHAOS_REPORT naming a file, and prints it."""

from __future__ import annotations

import json
import os

REPORT_ENVIRONMENT = "CHAINRULE_CHAOS_REPORT"


def report_recovery(fault: str, seconds: float, steps_lost: int, note: str = "") -> None:
    """`seconds`: from the fault to training going on again; `steps_lost`: steps done before
    the fault that had to be trained again. Printed, and added to $CHAINRULE_CHAOS_REPORT as
    one JSON line when it is set."""
    print(f"\n{fault}: recovered in {seconds:.2f} s, {steps_lost} steps lost. {note}")
    path = os.environ.get(REPORT_ENVIRONMENT)
    if path:
        with open(path, "a") as report:
            report.write(json.dumps({"fault": fault, "seconds": round(seconds, 3),
                                     "steps_lost": steps_lost, "note": note}) + "\n")
