//! PKCS#11 fault-injection shim.
