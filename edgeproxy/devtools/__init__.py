"""Development and test harnesses shipped with edgeproxy (used by the test suite and ``edgeproxy demo``)."""
