#include <linux/target_core_user.h>
