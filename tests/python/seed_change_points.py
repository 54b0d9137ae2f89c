import http.client
import json
import time

# --- 配置信息 ---
API_TOKEN = "d1e7f0a8-49df-4760-8cb2-09b7aeb48dbf-20250709180338" # 示例 Token
TASK_ID = 3000  # 示例任务 ID
TARGET_POINTS = 2   # 目标节点数

# 动态生成当前的毫秒级时间戳
current_timestamp = int(time.time() * 1000)

# --- API 调用 ---
conn = http.client.HTTPSConnection("openapi.suanli.cn")

payload = json.dumps({
   "task_id": TASK_ID,
   "points": TARGET_POINTS
})

headers = {
   'token': API_TOKEN,
   'timestamp': str(current_timestamp),
   'version': '1.0.0',
   'sign_str': '', 
   'Content-Type': 'application/json'
}

try:
    conn.request("POST", "/api/deployment/task/change_points", payload, headers)
    res = conn.getresponse()
    
    print(f"状态码: {res.status} {res.reason}")
    data = res.read()
    print("响应内容:")
    try:
        response_json = json.loads(data.decode('utf-8'))
        print(json.dumps(response_json, indent=4, ensure_ascii=False))
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(data.decode('utf-8', errors='ignore'))

finally:
    conn.close()
