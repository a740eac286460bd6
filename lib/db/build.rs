// `sqlx::migrate!` embeds migrations/ at compile time; rebuild when a migration is added or changed, or binaries
// built from a cached target would refuse a database that a fresher binary has migrated.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
