//! End-to-end tests and the nested KVM lab runner
