# Convenience wrappers. The two README commands are `make demo` and `make test`.
BUILD_DIR ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: setup configure build test demo bench clean format

setup:
	scripts/setup

configure:
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo $(CMAKE_FLAGS)

build: configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

# Everything: install, build, run the whole test suite.
test: setup build
	cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS) --timeout 1200

# The main job end to end on the built-in scenario.
demo: setup build
	scripts/demo

bench: build
	$(BUILD_DIR)/bin/mergeguard-bench merge

format:
	clang-format -i $$(git ls-files '*.cc' '*.h')

clean:
	rm -rf $(BUILD_DIR)
