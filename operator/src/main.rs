fn main() {
    print!("{}", operator::crd::crd_yaml().unwrap());
}
