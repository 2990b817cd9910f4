# ferry: the two set-up commands on a fresh machine are `make demo` and
# `make test`; both install what they need first (`make deps`).
GO      ?= go
BIN     := bin/ferry
# The version stamped into the binary: the git description, or "dev".
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/ferry-dr/ferry/internal/cli.Version=$(VERSION)
DEB_PKGS := qemu-utils qemu-system-x86 libnbd-bin fio e2fsprogs nbdkit jq pv cpio busybox-static iproute2 ca-certificates curl bc syslinux syslinux-common mtools dosfstools chromium fonts-dejavu-core rsync systemd libvirt-daemon-system libvirt-clients dnsmasq-base ovmf etcd-server libguestfs-tools python3-guestfs linux-image-cloud-amd64 xfsprogs

.PHONY: screenshots all build man package deps demo demo-libvirt demo-plan demo-ransomware demo-ha demo-soak test torture vet fuzz bench bench-scale bench-wan guest clean

all: build

# A static binary (pure Go: the SQLite store is modernc.org/sqlite), its
# version stamped from git.
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/ferry

# Man pages, one per command, from the command tree.
man: build
	rm -rf build/man && $(BIN) man build/man

# A Debian package: the binary, systemd units for the agent and the
# vault, their config files, man pages and shell completions.
package: build
	packaging/build-deb.sh $(BIN) $(VERSION) build/package

# Debian packages, installed only when missing (idempotent).
deps:
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "make deps: installing$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi
	@$(GO) mod download

guest: deps
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags=-s -o build/ferry-guest ./cmd/ferry-guest
	guest/build.sh build/guest build/ferry-guest
	guest/build-disk.sh build/guest

vet:
	$(GO) vet ./...

test: deps vet guest
	$(GO) test -race -count=1 -timeout 30m ./...

# The torture suite at full length (make test runs it short): sites in
# network namespaces, a delay proxy, tbf, kill -9, a full disk. Ends with
# a RESULT torture line.
torture: deps
	mkdir -p build && FERRY_TORTURE=full $(GO) test -count=1 -timeout 30m -run '^(TestTorture|TestLifecycleKills)$$' -v ./e2e | tee build/torture.log | grep -E '^(RESULT|TORTURE|--- |    --- )'
	@grep -q '^RESULT torture .* failed=0 lost_records=0' build/torture.log
	@grep -q '^RESULT lifecycle-kills ' build/torture.log
	@! grep -q '^--- FAIL' build/torture.log

# Screenshots of the portal's main pages, from its browser test, into
# docs/screenshots.
screenshots: deps guest
	FERRY_SCREENSHOTS=$(CURDIR)/docs/screenshots $(GO) test -count=1 -timeout 15m -run '^(TestPortal|TestPortalVMs|TestRansomware)$$' -v ./e2e

# Fuzz every parser for FUZZTIME each (default 30s).
FUZZTIME ?= 30s
fuzz:
	$(GO) test ./internal/nbd -run '^$$' -fuzz '^FuzzParseRequest$$' -fuzztime $(FUZZTIME)
	$(GO) test ./internal/nbd -run '^$$' -fuzz '^FuzzParseInfoRequest$$' -fuzztime $(FUZZTIME)
	$(GO) test ./internal/nbd -run '^$$' -fuzz '^FuzzServerOptions$$' -fuzztime $(FUZZTIME)
	$(GO) test ./internal/journal -run '^$$' -fuzz '^FuzzDecodeEntry$$' -fuzztime $(FUZZTIME)
	$(GO) test ./internal/checksum -run '^$$' -fuzz '^FuzzUpdate$$' -fuzztime $(FUZZTIME)
	$(GO) test ./internal/link -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime $(FUZZTIME)
	$(GO) test ./internal/link -run '^$$' -fuzz '^FuzzRead$$' -fuzztime $(FUZZTIME)
	$(GO) test ./internal/vault -run '^$$' -fuzz '^FuzzRequestBodies$$' -fuzztime $(FUZZTIME)
	$(GO) test ./internal/agent -run '^$$' -fuzz '^FuzzRequestBodies$$' -fuzztime $(FUZZTIME)
	$(GO) test ./internal/api -run '^$$' -fuzz '^FuzzCheckName$$' -fuzztime $(FUZZTIME)
	$(GO) test ./internal/libvirt -run '^$$' -fuzz '^FuzzDescribeXML$$' -fuzztime $(FUZZTIME)

# The DR lifecycle at 1, 4 and 16 GiB (about 10 minutes, 40 GiB of scratch).
bench-scale: deps build guest
	FERRY=$(CURDIR)/$(BIN) bench/scale.sh

# Replication over an emulated WAN: 100 Mbit/s at 40 ms RTT, with 1 %
# loss, and a 50 Mbit/s cap (root: namespaces and TUN devices; ~6 min).
bench-wan: deps build
	FERRY=$(CURDIR)/$(BIN) bench/wan.sh

bench: deps build
	FERRY=$(CURDIR)/$(BIN) bench/nbd.sh
	FERRY=$(CURDIR)/$(BIN) bench/replication.sh
	$(GO) run ./bench/reprotect
	bench/entropy.sh

demo: deps build guest
	FERRY=$(CURDIR)/$(BIN) scripts/demo.sh

# The tutorial on a libvirt domain, imported live (docs/libvirt.md).
demo-libvirt: deps build guest
	FERRY=$(CURDIR)/$(BIN) scripts/demo-libvirt.sh

# A recovery plan of three VMs: drill, failover, commit, reprotect, failback.
demo-plan: deps build guest
	FERRY=$(CURDIR)/$(BIN) scripts/demo-plan.sh

# Ransomware caught in the write stream; files restored from the last
# clean point; a drill at it. Ends with a RESULT ransomware line.
demo-ransomware: deps build guest
	FERRY=$(CURDIR)/$(BIN) scripts/demo-ransomware.sh

# The control plane survives its site: ferry up --ha, east killed whole.
demo-ha: deps build guest
	FERRY=$(CURDIR)/$(BIN) scripts/demo-ha.sh

# The demo RUNS times in a row (default 10), optionally beside a CPU hog
# (STRESS=1: stress-ng --cpu 2); stops at the first failure.
RUNS ?= 10
STRESS ?= 0
demo-soak: deps build guest
	FERRY=$(CURDIR)/$(BIN) RUNS=$(RUNS) STRESS=$(STRESS) scripts/demo-soak.sh

clean:
	rm -rf bin build
