"""The load generator behind `rtmonitor send` and `rtmonitor bench`, and the launcher that
starts `rtmonitor serve` as a child process for `bench` and the tests."""
