//! Link flags for the fake libnvidia-ml.

fn main() {
    // Keep the library mapped after the last dlclose: nvml-wrapper closes it when the last `Nvml`
    // drops, and the fake's in-memory state (events already delivered, compute modes set) must
    // outlive that for the rest of the process, as the real driver's state does.
    println!("cargo:rustc-link-arg-cdylib=-Wl,-z,nodelete");
}
