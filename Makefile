# beaconbox: `make run` runs the main job, `make test` runs every test.
# Both set up a fresh Debian 12 machine on first use (resources/install.sh).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

PREFIX ?= /usr/local
BEACON_SHARE_DIR ?= /usr/share/beacon
CARGO ?= cargo
BUILD ?= $(CURDIR)/build
export CARGO_TARGET_DIR ?= $(CURDIR)/target

# Binaries `make install` puts in $(PREFIX)/bin (built with the `product`
# profile: release with whole-program optimisation, see Cargo.toml).
BINS := beacon-vmm beacon-initrd beacon-net containerd-shim-beaconbox-v1
PRODUCT_PACKAGES := -p beacon-vmm -p beacon-initrd -p beacon-netmgr -p beacon-shim -p vminitd
# When this make started (for `make test`'s total, which includes setup and kernel).
TEST_START := $(shell date +%s.%N)

.PHONY: all setup kernel hello-initrd run hello test matrix bench lint unit install clean

all: kernel
	$(CARGO) build --workspace --release

# Debian packages and virtiofsd; a no-op when everything is present.
setup:
	resources/install.sh

# The beacon kernel, cached by config hash under ~/.cache/beaconbox/kernel.
kernel: setup
	dir=$$(kernel-config/build.sh); mkdir -p $(BUILD)/kernel; \
	ln -sfn $$dir/vmlinux $(BUILD)/kernel/vmlinux; \
	ln -sfn $$dir/bzImage $(BUILD)/kernel/bzImage; \
	ln -sfn $$dir/config $(BUILD)/kernel/config

# An initrd whose init greets and ends the VM (the main job until the shim lands).
hello-initrd: setup
	$(CARGO) build -q -p beacon-initrd
	mkdir -p $(BUILD)
	$(CARGO_TARGET_DIR)/debug/beacon-initrd --init resources/hello-init \
	    --busybox /bin/busybox --output $(BUILD)/hello-initrd.gz

# The main job: a private containerd runs a busybox container in its own microVM
# through our shim and VMM (in the nested KVM lab when this host has no hardware KVM).
run: kernel
	resources/run-container

# Boot the beacon kernel with the hello initrd alone (no containerd, no shim).
# BACKEND=qemu|kvm.
hello: kernel hello-initrd
	resources/run-hello $(BUILD)/kernel/vmlinux $(BUILD)/hello-initrd.gz

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -q -- -D warnings

unit:
	$(CARGO) test --workspace --lib --bins

# Every test: lint, unit, integration, and the VM tests (lab or hardware KVM), then
# the location-sensitive tests from a copy of the checkout under /tmp; ends with
# each test binary's wall time, the lab's freeze-and-retry warnings and a total
# (tests/run-all).
test: setup kernel
	TEST_START=$(TEST_START) MAKE="$(MAKE)" CARGO="$(CARGO)" tests/run-all

# The VM matrix: every device and boot variant on {our VMM, the QEMU backend} x
# {the beacon kernel, Debian's stock cloud kernel} (the device suite, in the
# nested lab on hosts without hardware KVM, directly otherwise), printed as a
# pass/fail table with each boot's seconds; the whole log stays in
# $(BUILD)/matrix.log. `make test` runs the same suite.
matrix: kernel
	mkdir -p $(BUILD)
	rc=0; $(CARGO) test --workspace --test devices -- --nocapture >$(BUILD)/matrix.log 2>&1 || rc=$$?; \
	echo "backend kernel    boot  result seconds"; \
	grep '^MATRIX ' $(BUILD)/matrix.log | sort | cut -d' ' -f2- \
	    || echo "(no boot finished: see $(BUILD)/matrix.log)"; \
	echo "matrix: the device suite exited $$rc (lab seconds are emulated: compare ratios); log: $(BUILD)/matrix.log"; \
	exit $$rc

# Every benchmark side by side with the QEMU backend (and runc) in one lab VM
# (directly on hardware KVM), then tests/bench/results/<date>-<host>.json, .md
# and .html (tests/bench/run; BENCH_RUNS, BENCH_ONLY). Hours in the lab with
# the default 3 runs; BENCH_RUNS=1 for a quick look.
bench: kernel
	tests/bench/run

install: kernel
	$(CARGO) build --profile product --bins $(PRODUCT_PACKAGES)
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(BEACON_SHARE_DIR)/kernel
	for b in $(BINS); do install -m 0755 $(CARGO_TARGET_DIR)/product/$$b $(DESTDIR)$(PREFIX)/bin/$$b; done
	install -m 0644 $(BUILD)/kernel/vmlinux $(DESTDIR)$(BEACON_SHARE_DIR)/kernel/beacon-kernel-x86_64
	$(CARGO_TARGET_DIR)/product/beacon-initrd --init $(CARGO_TARGET_DIR)/product/vminitd \
	    --busybox /bin/busybox --crun /usr/bin/crun \
	    --output $(DESTDIR)$(BEACON_SHARE_DIR)/kernel/beacon-initrd
	@echo "install: $(DESTDIR)$(BEACON_SHARE_DIR)/kernel/beacon-initrd is" \
	    "$$(stat -c %s $(DESTDIR)$(BEACON_SHARE_DIR)/kernel/beacon-initrd) bytes"

clean:
	rm -rf $(BUILD)
	$(CARGO) clean

# Fuzz targets of the guest-facing parsers (devices/fuzz): a bounded run of each
# (make test runs it at the end of its main lane, tests/run-all);
# devices/fuzz/run-long for long runs.
.PHONY: fuzz-short fuzz
fuzz-short:
	devices/fuzz/run --seconds 5

# Every fuzz target for FUZZ_SECONDS each (default 720: 84 minutes over the
# seven targets), one after another; prints executions per target.
FUZZ_SECONDS ?= 720
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) devices/fuzz/run-long

# The shim killed (SIGKILL, BEACON_FAULT) at each step of the Task API:
# create, start, exec and delete, each followed by the check that nothing is
# left; inside the containerd VM suite (make test runs the `start` step only).
.PHONY: faults
faults: setup kernel
	BEACON_TEST_FAULT_STEPS=create,start,exec,delete $(CARGO) test -p beacon-shim --test vm_containerd -- --nocapture
