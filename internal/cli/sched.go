package cli

import (
	"os"
	"runtime"
)

// dataPathProcs gives the Go scheduler twice as many Ps as it has CPUs
// (at least 4), unless GOMAXPROCS is set; the processes that serve disks
// call it first.
//
// Why: the data path spends most of its time in system calls that copy a
// payload into the page cache (100-300 µs for 1 MiB). While a goroutine
// is in such a call, the runtime's monitor takes its P away and starts
// another thread on it if no other P is idle; the call's thread must then
// find a P again when it returns. With as many Ps as CPUs and two busy
// goroutines per connection (the request loop and the read-ahead), there
// is never an idle P, so every large write paid for that hand-off in
// thread wake-ups: a third of the process's CPU samples were in the
// scheduler. Spare Ps let the calling thread keep its P. Measured with
// 1 MiB sequential writes on 2 CPUs: 1,810-2,020 writes/s at 2 Ps,
// 2,380-2,740 at 3, 2,290-2,850 at 4, 2,630-2,670 at 8 (same session);
// 4 KiB random writes, with and without FLUSH, unchanged.
func dataPathProcs() {
	if os.Getenv("GOMAXPROCS") != "" {
		return
	}
	runtime.GOMAXPROCS(max(4, 2*runtime.GOMAXPROCS(0)))
}
