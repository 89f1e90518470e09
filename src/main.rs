fn main() {
    melora::init();
}
