//! containerd shim v2 for beaconbox
