use storage::{open, BlockDevice, OpenOptions};
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::Path::new(&args[1]);
    let cmd = args[2].as_str();
    let d = open(path, &OpenOptions::default()).unwrap();
    match cmd {
        "write" => {
            let off: u64 = args[3].parse().unwrap();
            let len: usize = args[4].parse().unwrap();
            let pat: u8 = args[5].parse().unwrap();
            d.write_at(&vec![pat; len], off).unwrap();
            d.flush().unwrap();
        }
        "read" => {
            let off: u64 = args[3].parse().unwrap();
            let len: usize = args[4].parse().unwrap();
            let mut b = vec![0; len];
            d.read_at(&mut b, off).unwrap();
            let mut counts = std::collections::BTreeMap::new();
            for x in b { *counts.entry(x).or_insert(0) += 1; }
            println!("{counts:?}");
        }
        "zero" => { d.write_zeroes(args[3].parse().unwrap(), args[4].parse().unwrap()).unwrap(); }
        "discard" => { d.discard(args[3].parse().unwrap(), args[4].parse().unwrap()).unwrap(); }
        _ => panic!(),
    }
}
