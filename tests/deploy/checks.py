"""PASS/FAIL lines and the "N passed, M failed" summary of the deploy test scripts."""
import sys


class Checks:
    def __init__(self):
        self.passed = self.failed = 0

    def ok(self, msg):
        self.passed += 1
        print("PASS: " + msg, flush=True)

    def bad(self, msg):
        self.failed += 1
        print("FAIL: " + msg, flush=True)

    def check(self, cond, msg, detail=""):
        """PASS or FAIL `msg` (with `detail` on failure); returns `cond`."""
        (self.ok if cond else self.bad)(msg + ("" if cond or not detail else ": " + str(detail)))
        return cond

    def finish(self, rc=0):
        """Prints the summary and exits: 1 on any failure or a non-zero `rc`."""
        print("%d passed, %d failed" % (self.passed, self.failed))
        sys.exit(1 if self.failed or rc else 0)
