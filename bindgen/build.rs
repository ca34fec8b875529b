//! Generates bindings to `linux/target_core_user.h` (from the build
//! machine's kernel headers, Debian's linux-libc-dev) with bindgen.
//!
//! `struct tcmu_mailbox` is left out and written by hand in `lib.rs`: it is
//! `packed` yet puts `cmd_tail` on a 64-byte boundary, which bindgen cannot
//! express. Tests check every layout against gcc's.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_type("tcmu_.*")
        .allowlist_var("TCMU_.*")
        .blocklist_type("tcmu_mailbox")
        .derive_default(true)
        .derive_debug(true)
        .prepend_enum_name(false)
        .wrap_unsafe_ops(true)
        .layout_tests(true)
        .generate()
        .expect("bindgen could not read linux/target_core_user.h (install linux-libc-dev and libclang-dev)");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings.write_to_file(out.join("bindings.rs")).expect("writing bindings.rs");
}
