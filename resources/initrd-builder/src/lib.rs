//! Reproducible initrd builder
