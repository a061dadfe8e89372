"""The chaos suite: faults injected into real jobs (real signals, real Ray, real servers, a
real full tmpfs, real damaged files), each case ending with weights bitwise equal to an
undisturbed run of the same spec, trained once per module and shared by its cases. Every case
reports its recovery (tests/chaos/recovery_report.py); `bench/chaos.py` prints the table."""
