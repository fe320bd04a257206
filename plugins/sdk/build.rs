//! Rebuilds the bindings when the WIT changes: `wit_bindgen::generate!`
//! reads ../../wit at compile time, which cargo does not track by itself.

fn main() {
    println!("cargo:rerun-if-changed=../../wit");
    for entry in std::fs::read_dir("../../wit").into_iter().flatten().flatten() {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
}
