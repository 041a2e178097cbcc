#include "common.hpp"

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace dj {

bool path_exists(const std::string& path) {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0;
}

bool is_directory(const std::string& path) {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string join_path(const std::string& folder, const std::string& name) {
    if (folder.empty()) return name;
    if (folder.back() == '/') return folder + name;
    return folder + "/" + name;
}

std::vector<uint8_t> read_file(const std::string& path) {
    FILE* fh = std::fopen(path.c_str(), "rb");
    if (!fh) {
        if (errno == ENOENT) fail(DJ_ERR_NOT_FOUND, path + ": no such file or directory");
        fail(DJ_ERR_IO, path + ": cannot open (" + std::strerror(errno) + ")");
    }
    std::vector<uint8_t> data;
    uint8_t buf[1 << 16];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, fh)) > 0) data.insert(data.end(), buf, buf + n);
    bool bad = std::ferror(fh) != 0;
    std::fclose(fh);
    if (bad) fail(DJ_ERR_IO, path + ": read error");
    return data;
}

std::string read_text_file(const std::string& path) {
    std::vector<uint8_t> data = read_file(path);
    return std::string(data.begin(), data.end());
}

void write_file_atomic(const std::string& path, const uint8_t* data, size_t size) {
    std::string tmp = path + ".tmp-" + std::to_string(::getpid());
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) fail(DJ_ERR_IO, path + ": cannot write (" + std::strerror(errno) + ")");
    size_t done = 0;
    while (done < size) {
        ssize_t w = ::write(fd, data + done, size - done);
        if (w < 0) {
            if (errno == EINTR) continue;
            int err = errno;
            ::close(fd);
            ::unlink(tmp.c_str());
            fail(DJ_ERR_IO, path + ": write failed (" + std::strerror(err) + ")");
        }
        done += static_cast<size_t>(w);
    }
    if (::fsync(fd) != 0 || ::close(fd) != 0) {
        ::unlink(tmp.c_str());
        fail(DJ_ERR_IO, path + ": cannot flush (" + std::strerror(errno) + ")");
    }
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
        int err = errno;
        ::unlink(tmp.c_str());
        fail(DJ_ERR_IO, path + ": cannot rename into place (" + std::strerror(err) + ")");
    }
    std::string folder = ".";
    size_t slash = path.find_last_of('/');
    if (slash != std::string::npos) folder = slash == 0 ? "/" : path.substr(0, slash);
    int dfd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        ::fsync(dfd);  // best effort: some file systems refuse fsync on folders
        ::close(dfd);
    }
}

namespace {
// Valid second-byte range of a lead byte (Unicode Table 3-7), or {0, 0} for
// bytes that cannot start a sequence.
void lead_info(uint8_t b, int& need, uint8_t& lo, uint8_t& hi) {
    need = 0;
    lo = 0x80;
    hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) need = 1;
    else if (b == 0xE0) { need = 2; lo = 0xA0; }
    else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) need = 2;
    else if (b == 0xED) { need = 2; hi = 0x9F; }
    else if (b == 0xF0) { need = 3; lo = 0x90; }
    else if (b >= 0xF1 && b <= 0xF3) need = 3;
    else if (b == 0xF4) { need = 3; hi = 0x8F; }
    else need = -1;
}
}  // namespace

int32_t decode_utf8(const std::string& s, size_t& i) {
    uint8_t b = static_cast<uint8_t>(s[i]);
    if (b < 0x80) {
        ++i;
        return b;
    }
    int need;
    uint8_t lo, hi;
    lead_info(b, need, lo, hi);
    if (need < 0) {
        ++i;
        return -1;
    }
    uint32_t cp = b & (need == 1 ? 0x1F : need == 2 ? 0x0F : 0x07);
    size_t j = i + 1;
    for (int k = 0; k < need; ++k, ++j) {
        if (j >= s.size()) {
            i = j;
            return -1;
        }
        uint8_t c = static_cast<uint8_t>(s[j]);
        uint8_t l = k == 0 ? lo : 0x80, h = k == 0 ? hi : 0xBF;
        if (c < l || c > h) {
            i = j;  // the failing byte starts the next attempt
            return -1;
        }
        cp = (cp << 6) | (c & 0x3F);
    }
    i = j;
    return static_cast<int32_t>(cp);
}

void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
        out += static_cast<char>(cp);
    } else if (cp < 0x800) {
        out += static_cast<char>(0xC0 | (cp >> 6));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out += static_cast<char>(0xE0 | (cp >> 12));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
        out += static_cast<char>(0xF0 | (cp >> 18));
        out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    }
}

std::string utf8_lossy(const std::string& bytes) {
    std::string out;
    out.reserve(bytes.size());
    size_t i = 0;
    while (i < bytes.size()) {
        size_t start = i;
        int32_t cp = decode_utf8(bytes, i);
        if (cp < 0) append_utf8(out, 0xFFFD);
        else out.append(bytes, start, i - start);
    }
    return out;
}

size_t utf8_incomplete_tail(const std::string& s) {
    // A sequence is at most 4 bytes: look back at most 3 for its lead byte.
    size_t n = s.size();
    for (size_t back = 1; back <= 3 && back <= n; ++back) {
        uint8_t b = static_cast<uint8_t>(s[n - back]);
        if ((b & 0xC0) == 0x80) continue;  // continuation: keep looking for the lead
        int need;
        uint8_t lo, hi;
        lead_info(b, need, lo, hi);
        if (need <= 0 || static_cast<size_t>(need) < back) return 0;  // complete, or not a sequence
        // Truncated only if what is there is a valid prefix.
        for (size_t k = 1; k < back; ++k) {
            uint8_t c = static_cast<uint8_t>(s[n - back + k]);
            uint8_t l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
            if (c < l || c > h) return 0;
        }
        return back;
    }
    return 0;
}

double now_seconds() {
    using clock = std::chrono::steady_clock;
    return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

}  // namespace dj
