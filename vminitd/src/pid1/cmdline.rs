//! Kernel command-line parameters vminitd reads (`beacon.*`).
